"""Judges: a score for each sampled completion of a prompt (`generate.judge`).

- `answer`: 1.0 when the completion is the row's `answer`, else 0.0, compared as the held-out
  evaluation compares them (evaluate.normalize: no case, surrounding blanks or trailing punctuation).
- `function`: `generate.judge_function`, MODULE:FUNCTION or path/to/file.py:FUNCTION, called as
  function(prompt, completion, row) -> float, with the prompt as the row gives it and the whole row.
- `reward_model`: a sequence-classification checkpoint with one output (`generate.judge_model`, hub id
  or directory), scoring the conversation [prompt turns, the completion as the assistant's turn].

A judge that fails on a row raises JudgeError: one line naming the judge and the row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError
from .evaluate import normalize
from .models import DTYPES, ModelError, hf_dir
from .rows import DataError, turns


class JudgeError(DataError):
    """A judge that cannot score a row, explained in one line naming the row."""
    same_on_every_process = True  # every process learns of it from the gathered results and stops alike


class AnswerJudge:
    name = "answer"

    def check(self, prompts) -> None:
        """Every row must carry an answer to compare with: found before anything is sampled."""
        for prompt in prompts:
            if prompt.row.get("answer") is None:
                raise JudgeError(f"{prompt.where}: generate.judge answer needs an 'answer' field in every row; "
                                 "this row has none")

    def score(self, prompts, completions: list[list[str]]) -> list[list[float]]:
        return [[float(normalize(text) == normalize(str(prompt.row["answer"]))) for text in texts]
                for prompt, texts in zip(prompts, completions)]


class FunctionJudge:
    def __init__(self, spec: str):
        self.name, self.function = spec, load_function(spec)

    def check(self, prompts) -> None:
        pass

    def score(self, prompts, completions: list[list[str]]) -> list[list[float]]:
        scores = []
        for prompt, texts in zip(prompts, completions):
            row_scores = []
            for text in texts:
                try:
                    value = self.function(prompt.given, text, dict(prompt.row))
                except Exception as e:  # the user's code: any failure is one line naming the row
                    detail = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
                    raise JudgeError(f"{prompt.where}: generate.judge_function {self.name} failed: "
                                     f"{type(e).__name__}: {detail}") from None
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise JudgeError(f"{prompt.where}: generate.judge_function {self.name} returned {value!r:.60}, "
                                     "not a finite number")
                row_scores.append(float(value))
            scores.append(row_scores)
        return scores


def load_function(spec: str):
    """MODULE:FUNCTION (importable, the working directory included) or path/to/file.py:FUNCTION."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ConfigError(f"generate.judge_function: no file {target}")
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `dpo-train` runs as a script: its own folder is on the path, not here
                sys.path.append(os.getcwd())
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"generate.judge_function: cannot import {target} ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"generate.judge_function: {target} has no function {name!r}")
    return function


class RewardModelJudge:
    """Scores each conversation with the classifier's single output, batched, right-padded (exact for
    causal and bidirectional models alike: real tokens never attend to padding), pooled where the
    checkpoint's own class pools (the last token that is not padding, or the first for encoders)."""

    def __init__(self, name_or_path: str, device, dtype: str = "float32", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.device, self.batch_size = name_or_path, device, batch_size
        try:
            source = hf_dir(name_or_path)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:
            raise ModelError(f"generate.judge_model {name_or_path}: cannot load a sequence-classification model "
                             f"({str(e).splitlines()[0]})") from None
        if self.model.config.num_labels != 1:
            raise ModelError(f"generate.judge_model {name_or_path}: a reward model has one output, this one has "
                             f"{self.model.config.num_labels} (num_labels)")
        if self.tokenizer.pad_token is None:  # pads are masked; any id will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the class finds each sequence's end by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()

    def check(self, prompts) -> None:
        pass

    def text(self, prompt, completion: str) -> tuple[str, bool]:
        """(the text to score, whether the tokenizer adds its special tokens to it)."""
        if self.tokenizer.chat_template:
            conversation = turns(prompt, "user") + [{"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False), False
        if isinstance(prompt, list):
            raise JudgeError(f"generate.judge_model {self.name}: its tokenizer has no chat template for a conversation")
        return prompt + completion, True

    @torch.no_grad()
    def score(self, prompts, completions: list[list[str]]) -> list[list[float]]:
        items = [(prompt, text) for prompt, texts in zip(prompts, completions) for text in texts]
        flat = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            try:
                texts = [self.text(prompt.given, completion) for prompt, completion in chunk]
                special = texts[0][1]
                batch = self.tokenizer([text for text, _ in texts], add_special_tokens=special, padding=True,
                                       return_tensors="pt").to(self.device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            except JudgeError:
                raise
            except Exception as e:
                raise JudgeError(f"{chunk[0][0].where}: generate.judge_model {self.name} failed on this row's batch: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            flat += logits[:, 0].float().tolist()
        if not all(math.isfinite(value) for value in flat):
            bad = next(i for i, value in enumerate(flat) if not math.isfinite(value))
            raise JudgeError(f"{items[bad][0].where}: generate.judge_model {self.name} scored a completion {flat[bad]}")
        scores, at = [], 0
        for texts in completions:
            scores.append(flat[at:at + len(texts)])
            at += len(texts)
        return scores


def build_judge(generate, device, dtype: str = "float32"):
    """The judge `generate.judge` names, ready to score."""
    if generate.judge == "answer":
        return AnswerJudge()
    if generate.judge == "function":
        return FunctionJudge(generate.judge_function)
    return RewardModelJudge(generate.judge_model, device, dtype, generate.judge_batch_size)
