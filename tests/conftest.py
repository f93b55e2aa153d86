"""Shared fixtures: a tiny randomly initialised Llama with a character-level chat tokenizer,
and a small preference set, all made locally in seconds (no hub, no downloads)."""

from __future__ import annotations

import contextlib
import json
import os
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]


TORCH_THREADS = torch.get_num_threads()  # what a fresh process (a child run, a worker) starts with


@pytest.fixture(autouse=True)
def fresh_process_threads():
    """Each test starts and ends with a fresh process's torch thread count. A test that sets it (the
    parity scripts' --threads 1, a run's train.num_threads) would otherwise leave it to every later
    in-process run, whose sums then split differently from a child process's: a bitwise comparison
    between the two failed in CI (test_signals' SIGKILL during final/) after test_parity had run."""
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(TORCH_THREADS)


@contextlib.contextmanager
def cache_at(path):
    """DPO_TRAIN_CACHE set to `path` inside, for an in-process run in a fixture wider than a test (where
    monkeypatch cannot reach); the value it had (or its absence) is put back after."""
    before = os.environ.get("DPO_TRAIN_CACHE")
    os.environ["DPO_TRAIN_CACHE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["DPO_TRAIN_CACHE"]
        else:
            os.environ["DPO_TRAIN_CACHE"] = before


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="<|im_end|>", chat_template=chat_template)


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=4)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny chat model: from_pretrained-loadable like any local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = __import__("random").Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([-2, -1, 1, 2])),
                     "answer": str(a + b)})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(train.jsonl, eval.jsonl) of single-digit sums: chosen is right, rejected off by one or two."""
    path = tmp_path_factory.mktemp("data")
    return write_jsonl(path / "train.jsonl", arithmetic_pairs(48, 0)), write_jsonl(path / "eval.jsonl", arithmetic_pairs(16, 1))
