"""Bad data is one DataError line naming the file, the row (0-based) or line (1-based) and the field;
rows without a `prompt` get the prefix that chosen and rejected share."""

import datasets
import pytest

from conftest import make_tokenizer, write_jsonl
from dpo_train.data import build_dataset, tokenize_pair
from dpo_train.rows import DataError, split_shared_prefix

GOOD = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}


def error(source, tokenizer=None) -> str:
    with pytest.raises(DataError) as e:
        build_dataset(str(source), "train", tokenizer or make_tokenizer(), 64, 32)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(source))  # one line that names the file
    return message


def test_missing_field(tmp_path):
    rows = [{"prompt": "a", "chosen": "b"}]
    assert "missing field 'rejected' (columns: prompt, chosen; data.columns maps other names)" in error(write_jsonl(tmp_path / "d.jsonl", rows))


def test_misspelled_field_is_named_with_its_likely_spelling(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejectd": "c"}]
    assert "missing field 'rejected' (did you mean 'rejectd'?" in error(write_jsonl(tmp_path / "d.jsonl", rows))
    rows = [{"promt": "a", "chosen": "b", "rejected": "c"}]  # not taken for an implicit prompt
    assert "missing field 'prompt' (did you mean 'promt'?" in error(write_jsonl(tmp_path / "e.jsonl", rows))


def test_null_or_absent_value(tmp_path):
    rows = [GOOD, GOOD, {"prompt": "a", "chosen": None, "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    assert error(write_jsonl(tmp_path / "d.jsonl", rows)).endswith(": row 2 (0-based): field 'chosen' is null or missing")
    assert error(write_jsonl(tmp_path / "e.jsonl", rows[:2] + rows[3:])).endswith(
        ": row 2 (0-based): field 'rejected' is null or missing")


def test_non_string_value(tmp_path):
    rows = [GOOD, {"prompt": "a", "chosen": "b", "rejected": 5}]  # a mixed column loads as JSON values
    assert error(write_jsonl(tmp_path / "d.jsonl", rows)).endswith(
        ": row 1 (0-based): field 'rejected' must be a string or a list of {role, content} messages, got int 5")
    rows = [{"prompt": 1, "chosen": "b", "rejected": "c"}, {"prompt": 2, "chosen": "b", "rejected": "c"}]
    assert "row 0 (0-based): field 'prompt' must be a string" in error(write_jsonl(tmp_path / "e.jsonl", rows))


def test_a_field_mixing_strings_and_conversations(tmp_path):
    rows = [GOOD, {"prompt": [{"role": "user", "content": "hi"}], "chosen": "b", "rejected": "c"}]
    assert error(write_jsonl(tmp_path / "d.jsonl", rows)).endswith(
        ": row 1 (0-based): field 'prompt' is a conversation, but in row 0 it is a string; use one form per field")


def test_bad_message_in_a_conversation(tmp_path):
    chat = lambda content: [{"role": "assistant", "content": content}]
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": chat("a"), "rejected": chat("b")},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant"}], "rejected": chat("b")}]
    assert "row 1 (0-based): field 'chosen' message 0 must be" in error(write_jsonl(tmp_path / "d.jsonl", rows))


def test_empty_string(tmp_path):
    rows = [GOOD, {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "  ", "chosen": "b", "rejected": "c"}]
    assert error(write_jsonl(tmp_path / "d.jsonl", rows)).endswith(": row 2 (0-based): field 'prompt' is an empty string")


def test_earliest_bad_row_is_reported_first(tmp_path):
    rows = [GOOD, {"prompt": "a", "chosen": "b", "rejected": None}, {"prompt": "", "chosen": "b", "rejected": "c"}]
    assert "row 1 (0-based): field 'rejected'" in error(write_jsonl(tmp_path / "d.jsonl", rows))


def test_identical_pairs_are_dropped_and_an_error_when_nothing_remains(tmp_path):
    same = {"prompt": "a", "chosen": "b", "rejected": "b"}
    _, _, stats = build_dataset(write_jsonl(tmp_path / "d.jsonl", [GOOD, same, same]), "train", make_tokenizer(), 64, 32)
    assert stats.kept == 1 and stats.dropped == {"chosen == rejected": 2}
    message = error(write_jsonl(tmp_path / "e.jsonl", [same, same]))
    assert "no usable pairs remain (0/2 pairs kept; dropped 2 (chosen == rejected)" in message


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b" "rejected": "c"}\n')
    assert error(path).endswith(": line 3: not valid JSON (Expecting ',' delimiter at column 31)")
    path = tmp_path / "d.json"  # one JSON array, not JSON Lines
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a"')
    assert ": line 2: not valid JSON" in error(path)


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n["a", "b", "c"]\n')
    assert error(path).endswith(": line 2: expected a JSON object with prompt, chosen, rejected, got list")


def test_non_utf8_bytes(tmp_path):
    good = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    (tmp_path / "d.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    assert error(tmp_path / "d.jsonl").endswith(": row 1 (0-based): field 'prompt' is not valid UTF-8 text")
    (tmp_path / "e.jsonl").write_bytes(good + good + b'{"prompt": "a", "ch\xe9sen": "b", "rejected": "c"}\n')
    offset = 2 * len(good) + len(b'{"prompt": "a", "ch')  # two 48-byte lines, then 19 bytes: 115
    assert error(tmp_path / "e.jsonl").endswith(f": line 3: not UTF-8 text (byte 0xe9 at offset {offset}); re-save it as UTF-8")


def test_empty_dataset(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    assert error(tmp_path / "d.jsonl").endswith(": the dataset is empty")
    datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(tmp_path / "d.parquet")
    assert error(tmp_path / "d.parquet").endswith(": the dataset is empty")


def test_unknown_file_type(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    assert "unknown file type '.csv'; use .jsonl, .json, .parquet" in error(tmp_path / "d.csv")


def test_path_that_does_not_exist(tmp_path):
    assert error(tmp_path / "nope.jsonl").endswith(": file not found")
    assert error(tmp_path / "no-such-dir").endswith(": file not found")


def test_hub_id_while_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = error("no-such-org/no-such-dataset")
    assert "no such local file or directory, and no hub dataset" in message and "Offline" in message


def test_conversations_need_a_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    message = error(write_jsonl(tmp_path / "d.jsonl", rows), make_tokenizer(chat_template=None))
    assert message.endswith("row 0 (0-based): field 'prompt' is a conversation (a list of messages), which needs a "
                            "chat template: the tokenizer has none, or data.chat_template is none")


@pytest.mark.parametrize("chosen, rejected, expected", [
    # Anthropic-HH style: split before the space that precedes the answers, so each starts " ..."
    ("\n\nHuman: Hi?\n\nAssistant: Sure thing", "\n\nHuman: Hi?\n\nAssistant: No",
     ("\n\nHuman: Hi?\n\nAssistant:", " Sure thing", " No")),
    # a shared first word stays whole: never cut inside "Yes"/"Yeah"
    ("Q: a\nA: Yes it is", "Q: a\nA: Yeah", ("Q: a\nA:", " Yes it is", " Yeah")),
    ("Q: a\nA: I think so", "Q: a\nA: I don't", ("Q: a\nA: I", " think so", " don't")),
    # chosen is a prefix of rejected
    ("say: hi", "say: hi there", ("say:", " hi", " hi there")),
])
def test_implicit_prompt_is_the_shared_prefix_cut_at_a_word_boundary(chosen, rejected, expected):
    assert split_shared_prefix(chosen, rejected) == expected


def test_implicit_prompt_of_conversations_keeps_a_message_per_completion():
    user, a, b = ({"role": r, "content": c} for r, c in (("user", "hi"), ("assistant", "a"), ("assistant", "b")))
    assert split_shared_prefix([user, a], [user, b]) == ([user], [a], [b])
    assert split_shared_prefix([user, a], [user, a]) == ([user], [a], [a])  # identical: dropped later, not an error
    with pytest.raises(DataError, match="share no leading messages"):
        split_shared_prefix([a], [b])


def test_implicit_prompt_datasets_tokenize_like_explicit_ones(tmp_path):
    hh = [{"chosen": "\n\nHuman: 1+2?\n\nAssistant: 3", "rejected": "\n\nHuman: 1+2?\n\nAssistant: 4"},
          {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: five"}]
    explicit = [{"prompt": "\n\nHuman: 1+2?\n\nAssistant:", "chosen": " 3", "rejected": " 4"},
                {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " five"}]
    tokenizer = make_tokenizer(chat_template=None)
    data, rows, stats = build_dataset(write_jsonl(tmp_path / "hh.jsonl", hh), "train", tokenizer, 64, 32)
    assert stats.implicit_prompts and stats.kept == 2 and rows["text"] == [True, True]
    assert rows["prompt"] == [[{"role": "user", "content": r["prompt"]}] for r in explicit]
    assert list(data) == [{k: v for k, v in tokenize_pair(r, tokenizer, 64, 32).items() if k.endswith("_ids")}
                          for r in explicit]


def test_rows_sharing_no_prefix_name_the_row(tmp_path):
    rows = [{"chosen": "Human: a Assistant: b", "rejected": "Human: a Assistant: c"}, {"chosen": "yes", "rejected": "no"}]
    assert "row 1 (0-based): no 'prompt' field, and 'chosen' and 'rejected' share no leading text" in error(
        write_jsonl(tmp_path / "d.jsonl", rows))


def test_checks_go_a_piece_at_a_time_and_still_name_the_row(tmp_path):
    """Columns are checked piece by piece (Arrow chunks, batches of conversations); a bad value far
    into a large file is still found, at its own row."""
    rows = [dict(GOOD) for _ in range(2500)]
    rows[2345] = {**GOOD, "prompt": " \t"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert datasets.load_dataset("json", data_files=path, split="train").data.column("prompt").num_chunks > 1  # premise
    assert error(path).endswith(": row 2345 (0-based): field 'prompt' is an empty string")
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": chat, "chosen": "a", "rejected": "b"} for _ in range(2500)]
    rows[2100] = {"prompt": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"}
    assert error(write_jsonl(tmp_path / "c.jsonl", rows)).endswith(
        ": row 2100 (0-based): field 'prompt' message 0 has empty content")
