import pytest

from conftest import make_tokenizer, write_jsonl
from dpo_train.collate import IGNORE_INDEX, collate
from dpo_train.data import DataError, build_dataset, tokenize_pair

ROW = {"prompt": "1+2=", "chosen": "3", "rejected": "four"}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_string_prompt_becomes_a_user_turn_and_completions_end_with_eos():
    tokenizer = make_tokenizer()
    pair = tokenize_pair(ROW, tokenizer, max_length=64, max_prompt_length=32)
    assert pair["prompt_ids"] == ids(tokenizer, "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")
    assert pair["chosen_ids"] == ids(tokenizer, "3") + [tokenizer.eos_token_id]
    assert pair["rejected_ids"] == ids(tokenizer, "four") + [tokenizer.eos_token_id]


def test_conversational_rows_render_like_string_rows():
    tokenizer = make_tokenizer()
    conversation = {"prompt": [{"role": "user", "content": "1+2="}],
                    "chosen": [{"role": "assistant", "content": "3"}],
                    "rejected": [{"role": "assistant", "content": "four"}]}
    assert tokenize_pair(conversation, tokenizer, 64, 32) == tokenize_pair(ROW, tokenizer, 64, 32)


def test_without_chat_template_text_is_used_as_it_is_and_conversations_are_refused():
    tokenizer = make_tokenizer(chat_template=None)
    pair = tokenize_pair(ROW, tokenizer, 64, 32)
    assert (pair["prompt_ids"], pair["chosen_ids"]) == (ids(tokenizer, "1+2="), ids(tokenizer, "3<|im_end|>"))
    with pytest.raises(DataError, match="chat template"):
        tokenize_pair({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}, tokenizer, 64, 32)


def test_labels_are_ignore_index_exactly_over_prompt_and_padding():
    tokenizer = make_tokenizer()
    pairs = [tokenize_pair(r, tokenizer, 64, 32) for r in
             (ROW, {"prompt": "a much longer prompt", "chosen": "yes", "rejected": "no"})]
    batch = collate(pairs, pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4  # chosen rows first, then rejected
    for row, (pair, side) in enumerate([(p, s) for s in ("chosen_ids", "rejected_ids") for p in pairs]):
        prompt, completion = pair["prompt_ids"], pair[side]
        n = len(prompt) + len(completion)
        assert batch["input_ids"][row, :n].tolist() == prompt + completion
        assert batch["labels"][row, :len(prompt)].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, len(prompt):n].tolist() == completion
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["num_tokens"].item() == sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                             for p in pairs)


def test_truncation_keeps_the_prompt_end_and_a_nonempty_completion():
    tokenizer = make_tokenizer(chat_template=None)
    row = {"prompt": "x" * 50 + "END", "chosen": "c" * 40, "rejected": "r"}
    pair = tokenize_pair(row, tokenizer, max_length=30, max_prompt_length=20)
    assert pair["prompt_ids"] == ids(tokenizer, ("x" * 50 + "END")[-20:])  # cut from the left
    assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) == 30  # chosen cut from the right
    assert pair["rejected_ids"] == ids(tokenizer, "r") + [tokenizer.eos_token_id]
    assert pair["prompt_truncated"] and pair["completion_truncated"] and pair["drop_reason"] == ""


def test_build_dataset_drops_and_counts_unusable_pairs(tmp_path):
    rows = [ROW, {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "<|im_end|>", "rejected": "x"},  # nothing but the end-of-turn token
            {"prompt": "pq", "chosen": "abcdef", "rejected": "abcxyz"}]  # equal once cut to 5 - 2 = 3 tokens
    data, raw, stats = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), "train", make_tokenizer(None), 5, 2)
    assert len(data) == len(raw) == 1 and stats.rows == 4 and stats.kept == 1
    assert raw[0] == {"prompt": [{"role": "user", "content": "1+2="}], "text": True}  # the internal form
    assert stats.dropped == {"chosen == rejected": 1, "chosen == rejected after truncation": 1, "empty completion": 1}
    assert data.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    # one token per character, no BOS: the kept pair's counts before truncation are "1+2=", "3" + EOS, "four" + EOS
    assert stats.full_lengths == {"prompt": [4], "chosen": [2], "rejected": [5]}
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 3  # "four", "same" and "abcdef" were cut


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_loads_local_files(tmp_path, suffix):
    import datasets
    path = tmp_path / f"pairs.{suffix}"
    rows = datasets.Dataset.from_list([ROW, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    {"jsonl": lambda: rows.to_json(path), "json": lambda: rows.to_json(path, lines=False),
     "parquet": lambda: rows.to_parquet(path)}[suffix]()
    data, _, stats = build_dataset(str(path), "train", make_tokenizer(), 64, 32)
    assert stats.kept == 2


def test_bad_sources_raise_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        build_dataset(str(tmp_path / "nope.jsonl"), "train", make_tokenizer(), 64, 32)
    with pytest.raises(DataError, match="missing field 'rejected'"):
        build_dataset(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}]), "train",
                      make_tokenizer(), 64, 32)
