"""Token ids against TRL's own tokenization: string data with data.chat_template none must give
exactly TRL 1.16's ids (its DPOTrainer._prepare_dataset, run on the same rows); conversations
differ on purpose in one place, the newline after the end-of-turn token."""

import types

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_tokenizer
from dpo_train.tokenization import tokenize_pair

IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
TEXT_ROWS = [
    {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "hello ", "chosen": "world", "rejected": "there"},  # "hello " + "world": the space merges into " world"
    {"prompt": "Question: how many legs does a spider have? Answer:", "chosen": " eight</s>", "rejected": " six legs"},
    {"prompt": "hello", "chosen": " world, hello world", "rejected": " worlds"},
]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style, as SmolLM2's) trained here in a moment, which adds BOS."""
    corpus = ["\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
              "Question: how many legs does a spider have? Answer: eight legs, usually.", "hello world " * 3] * 20
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def trl_tokenized(rows, tokenizer) -> list[dict]:
    """TRL's DPOTrainer._prepare_dataset itself (prompt extraction, EOS, tokenization), no truncation."""
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)  # the one attribute the method reads
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    return list(DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train"))


def test_string_rows_with_chat_template_none_give_trls_token_ids():
    tokenizer = bpe_tokenizer()
    trl = trl_tokenized(TEXT_ROWS, tokenizer)
    ours = [tokenize_pair(row, tokenizer, 10_000, 9_999, template=None) for row in TEXT_ROWS]
    assert [{k: p[k] for k in IDS} for p in ours] == [{k: p[k] for k in IDS} for p in trl]
    # what the comparison covers: BOS on the prompt, EOS once after each completion, and a prompt whose last
    # token merged into the completion's first (TRL starts the completion where the token sequences part)
    assert all(p["prompt_ids"][0] == tokenizer.bos_token_id and p["chosen_ids"][-1] == tokenizer.eos_token_id
               and p["chosen_ids"].count(tokenizer.eos_token_id) == 1 for p in ours)
    hello = tokenizer("hello ")["input_ids"]
    assert ours[1]["prompt_ids"] == hello[:-1] and tokenizer.decode(ours[1]["chosen_ids"]) == " world</s>"


def test_implicit_prompt_strings_are_split_at_a_word_boundary_then_tokenized_like_trl():
    hh = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in TEXT_ROWS[:1]]
    tokenizer = bpe_tokenizer()
    [ours] = [tokenize_pair(row, tokenizer, 10_000, 9_999, template=None) for row in hh]
    [trl] = trl_tokenized(TEXT_ROWS[:1], tokenizer)  # TRL given the prompt that our split finds
    assert {k: ours[k] for k in IDS} == {k: trl[k] for k in IDS}


def test_conversations_match_trl_but_stop_at_the_end_of_turn():
    """TRL scores the template's newline after <|im_end|> as part of each completion; we end the
    completion at the end-of-turn token, which is where generation stops."""
    tokenizer = make_tokenizer()
    row = {"prompt": [{"role": "user", "content": "1+2="}], "chosen": [{"role": "assistant", "content": "3"}],
           "rejected": [{"role": "assistant", "content": "four"}]}
    [trl] = trl_tokenized([row], tokenizer)
    ours = tokenize_pair(row, tokenizer, 10_000, 9_999)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ours["prompt_ids"] == trl["prompt_ids"]
    assert ours["chosen_ids"] + newline == trl["chosen_ids"] and ours["rejected_ids"] + newline == trl["rejected_ids"]


@pytest.mark.slow
def test_smollm2_string_rows_give_trls_token_ids():
    """The same check with the embedded model's own tokenizer (GPT-2 style BPE, no BOS added)."""
    from dpo_train.config import EMBEDDED_MODEL
    from dpo_train.models import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    rows = TEXT_ROWS + [{"prompt": "Translate to French: good morning\n", "chosen": "bonjour", "rejected": "bonsoir"}]
    ours = [tokenize_pair(row, tokenizer, 10_000, 9_999, template=None) for row in rows]
    assert [{k: p[k] for k in IDS} for p in ours] == [{k: p[k] for k in IDS} for p in trl_tokenized(rows, tokenizer)]
