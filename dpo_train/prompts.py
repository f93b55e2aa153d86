"""Prompts to sample from: the rows of `data.train` (a prompt per row is enough; chosen and rejected,
if there, are ignored), each prompt as the token ids the model continues. A prompt is tokenized as
training tokenizes it: rendered with the chat template and its generation header (or, without a
template, the text with the tokenizer's special tokens), then cut from the left to
`data.max_prompt_length`. So a completion sampled here continues exactly the prompt it is later
trained after."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .rows import DataError, turns, value_problem
from .sources import load_rows, parts, rename, take
from .templates import apply, resolve, with_system


@dataclass
class Prompt:
    given: object  # the prompt as the row gives it (text or turns): what the pairs file writes
    row: dict  # the whole row, every column (a function judge receives it; the answer judge reads `answer`)
    ids: list[int]  # what the model continues
    where: str  # "data/x.jsonl: row 3 (0-based)", for messages


def load_prompts(data, tokenizer, seed: int) -> list[Prompt]:
    """The prompts of data.train (one source or a mixture, `take` drawn under `seed` as training
    draws it), in order. Raises DataError naming the source and row of a missing or bad prompt."""
    template = resolve(data.chat_template, tokenizer)
    found = []
    for index, part in enumerate(parts(data.train, data.train_split, dataclasses.asdict(data.columns), "data.train")):
        rows = load_rows(part.path, part.split)
        if "prompt" in part.columns:  # only the prompt's name matters here: chosen and rejected may be absent
            rows = rename(rows, {"prompt": part.columns["prompt"]}, part.path)
        if "prompt" not in rows.column_names:
            raise DataError(f"{part.path}: no 'prompt' field to sample completions for (columns: "
                            f"{', '.join(rows.column_names)}; data.columns.prompt maps another name)")
        rows, numbers = take(rows, part, seed, index)
        for i, row in enumerate(rows):
            where = f"{part.path}: row {i if numbers is None else numbers[i]} (0-based)"
            if problem := value_problem(row["prompt"]):
                raise DataError(f"{where}: field 'prompt' {problem}")
            found.append(Prompt(row["prompt"], row, prompt_ids(row["prompt"], tokenizer, template, data.system_prompt,
                                                                data.max_prompt_length, where), where))
    if not found:
        raise DataError(f"{data.train}: no prompts")
    return found


def prompt_ids(prompt, tokenizer, template: str | None, system_prompt: str | None, max_prompt_length: int,
               where: str) -> list[int]:
    """One prompt's token ids, as tokenization.encode makes them for training."""
    if template is None:
        if isinstance(prompt, list):
            raise DataError(f"{where}: field 'prompt' is a conversation, which needs a chat template: the tokenizer "
                            "has none, or data.chat_template is none")
        ids = tokenizer(prompt)["input_ids"]
    else:
        try:
            text = apply(tokenizer, template, with_system(turns(prompt, "user"), system_prompt), add_generation_prompt=True)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]
