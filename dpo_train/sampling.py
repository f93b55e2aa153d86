"""Sampling K completions per prompt, in batches of prompts: Hugging Face `generate` (batched, left-
padded) or vLLM. Each batch is sampled under its own seed, (generate.seed, the batch's index), so the
completions are the same however the batches are split across processes, and a round that is
generated again after a crash gives the same pairs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError


@dataclass
class Sampled:
    """A batch's completions: texts[i][j] the j-th of prompt i; at_limit[i][j] whether it reached
    max_new_tokens without ending (it is cut there)."""
    texts: list[list[str]]
    at_limit: list[list[bool]]


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index`: independent streams for every (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def choose_backend(requested: str, num_processes: int) -> str:
    """hf or vllm, as `generate.backend` asks: auto takes vLLM when it is installed, a GPU is there and
    the run is one process (each process would otherwise start an engine on the same GPU)."""
    have_vllm, gpu = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    if requested == "vllm":
        for missing, why in ((not have_vllm, "vllm is not installed (pip install vllm)"),
                             (not gpu, "it needs a CUDA GPU, and there is none"),
                             (num_processes > 1, f"it runs on one process, not under a launcher ({num_processes})")):
            if missing:
                raise ConfigError(f"generate.backend: vllm cannot run: {why}; use generate.backend: hf")
        return "vllm"
    return "vllm" if requested == "auto" and have_vllm and gpu and num_processes == 1 else "hf"


class HFSampler:
    """Batched sampling with `model.generate`: each prompt of a batch is sampled K times
    (num_return_sequences), the batch left-padded so every prompt ends where generation starts."""

    def __init__(self, model, tokenizer, generate):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.k = model, tokenizer, generate.num_samples
        # what the settings record is all that runs: generate fills unset values from the checkpoint's
        # generation_config.json (min_p, no_repeat_ngram_size, ...), so that one is emptied
        model.generation_config = GenerationConfig()
        self.config = GenerationConfig(do_sample=True, temperature=generate.temperature, top_p=generate.top_p,
                                       top_k=generate.top_k, max_new_tokens=generate.max_new_tokens,
                                       num_return_sequences=generate.num_samples, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], seed: int) -> Sampled:
        device, pad = next(self.model.parameters()).device, self.tokenizer.pad_token_id
        width = max(map(len, prompt_ids))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        torch.manual_seed(seed)  # generate draws from the global generator
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=self.config)
        generated = output[:, width:]
        ended = (generated == self.tokenizer.eos_token_id).any(dim=1).tolist()
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        k = self.k
        return Sampled([texts[i * k:(i + 1) * k] for i in range(len(prompt_ids))],
                       [[not e for e in ended[i * k:(i + 1) * k]] for i in range(len(prompt_ids))])


class VLLMSampler:
    """vLLM on one GPU. This path has not run in dpo-train's tests: no machine here has vLLM."""

    def __init__(self, model_dir: str, dtype: str, generate):
        from vllm import LLM

        self.generate = generate
        self.llm = LLM(model=model_dir, dtype=dtype, seed=generate.seed)

    def __call__(self, prompt_ids: list[list[int]], seed: int) -> Sampled:
        from vllm import SamplingParams

        g = self.generate
        params = [SamplingParams(n=g.num_samples, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or -1,
                                 max_tokens=g.max_new_tokens, seed=batch_seed(seed, i)) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return Sampled([[c.text for c in o.outputs] for o in outputs],
                       [[c.finish_reason == "length" for c in o.outputs] for o in outputs])
