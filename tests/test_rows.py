"""The shapes hub preference sets come in, each from a local file of that shape, all normalised into
the same pairs; and the one-line errors of the H4 shape."""

import pytest

from conftest import make_tokenizer, write_jsonl
from dpo_train.data import build_dataset
from dpo_train.rows import DataError, normalise

user = lambda text: {"role": "user", "content": text}
assistant = lambda text: {"role": "assistant", "content": text}
system = lambda text: {"role": "system", "content": text}


def chatml(turns, generation: bool) -> str:
    """ChatML written out by hand, as the conftest tokenizer's template renders it."""
    text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
    return text + ("<|im_start|>assistant\n" if generation else "")


def expected_pair(tokenizer, prompt_turns, chosen: str, rejected: str) -> dict:
    """Prompt ids up to the generation header; each completion its text and the end-of-turn token."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"prompt_ids": ids(chatml(prompt_turns, True)), "chosen_ids": ids(chosen + "<|im_end|>"),
            "rejected_ids": ids(rejected + "<|im_end|>")}


# (hub set it mirrors, two rows of that shape, the prompt turns, chosen and rejected answers of row 1)
SHAPES = {
    "HuggingFaceH4/ultrafeedback_binarized (prompt + whole conversations)": (
        [{"prompt": "1+2=", "prompt_id": "a", "chosen": [user("1+2="), assistant("3")],
          "rejected": [user("1+2="), assistant("4")], "messages": [user("1+2="), assistant("3")],
          "score_chosen": 9.0, "score_rejected": 2.0},
         {"prompt": "2+2=", "prompt_id": "b", "chosen": [user("2+2="), assistant("4")],
          "rejected": [user("2+2="), assistant("five")], "messages": [user("2+2="), assistant("4")],
          "score_chosen": 9.0, "score_rejected": 2.0}],
        [user("2+2=")], "4", "five"),
    "trl-lib/ultrafeedback_binarized (conversations, no prompt)": (
        [{"chosen": [user("1+2="), assistant("3")], "rejected": [user("1+2="), assistant("4")], "score_chosen": 9.0},
         {"chosen": [user("2+2="), assistant("4")], "rejected": [user("2+2="), assistant("five")], "score_chosen": 8.0}],
        [user("2+2=")], "4", "five"),
    "string triples": (
        [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "five"}],
        [user("2+2=")], "4", "five"),
    "Anthropic/hh-rlhf (implicit-prompt strings)": (
        [{"chosen": "\n\nHuman: 1+2?\n\nAssistant: 3", "rejected": "\n\nHuman: 1+2?\n\nAssistant: 4"},
         {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: five"}],
        [user("\n\nHuman: 2+2?\n\nAssistant:")], " 4", " five"),
    "multi-turn with a system message": (
        [{"prompt": [system("Be terse."), user("1+2="), assistant("3"), user("and 2+2?")],
          "chosen": [assistant("4")], "rejected": [assistant("five")]}] * 2,
        [system("Be terse."), user("1+2="), assistant("3"), user("and 2+2?")], "4", "five"),
    "multi-turn, whole conversations repeating a prompt with a system turn": (
        [{"prompt": "1+2=", "chosen": [system("Be terse."), user("1+2="), assistant("3"), user("and 2+2?"), assistant("4")],
          "rejected": [system("Be terse."), user("1+2="), assistant("3"), user("and 2+2?"), assistant("five")]}] * 2,
        [system("Be terse."), user("1+2="), assistant("3"), user("and 2+2?")], "4", "five"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_tokenizes_as_its_prompt_and_answers(tmp_path, shape):
    rows, prompt, chosen, rejected = SHAPES[shape]
    tokenizer = make_tokenizer()
    pairs, kept, stats = build_dataset(write_jsonl(tmp_path / "set.jsonl", rows), "train", tokenizer, 256, 128)
    assert stats.kept == 2
    assert pairs[1] == expected_pair(tokenizer, prompt, chosen, rejected)
    assert kept[1]["prompt"] == prompt


def test_lvwerra_stack_exchange_columns_are_mapped(tmp_path):
    rows = [{"qid": 1, "question": "1+2=", "date": "2020", "metadata": ["x"], "response_j": "3", "response_k": "4"},
            {"qid": 2, "question": "2+2=", "date": "2020", "metadata": ["x"], "response_j": "4", "response_k": "five"}]
    tokenizer = make_tokenizer()
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    pairs, _, _ = build_dataset(write_jsonl(tmp_path / "se.jsonl", rows), "train", tokenizer, 256, 128, columns=columns)
    assert pairs[1] == expected_pair(tokenizer, [user("2+2=")], "4", "five")


def test_a_mapped_column_that_is_missing_or_bad_is_named(tmp_path):
    rows = [{"question": "1+2=", "response_j": "3", "response_k": None}]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    with pytest.raises(DataError) as e:
        build_dataset(path, "train", make_tokenizer(), 64, 32, columns={"prompt": "questoin", "chosen": "response_j",
                                                                       "rejected": "response_k"})
    assert str(e.value) == (f"{path}: data.columns.prompt: no column 'questoin' (did you mean 'question'? columns: "
                            "question, response_j, response_k)")
    with pytest.raises(DataError) as e:
        build_dataset(path, "train", make_tokenizer(), 64, 32, columns={"prompt": "question", "chosen": "response_j",
                                                                       "rejected": "response_k"})
    assert str(e.value) == f"{path}: row 0 (0-based): field 'rejected' (column 'response_k') is null or missing"


def test_a_prompt_that_disagrees_with_the_repeated_turns_names_the_row_and_the_difference(tmp_path):
    good = SHAPES["HuggingFaceH4/ultrafeedback_binarized (prompt + whole conversations)"][0]
    bad = {**good[1], "prompt": "2+3="}
    path = write_jsonl(tmp_path / "h4.jsonl", [good[0], good[1], bad])
    with pytest.raises(DataError) as e:
        build_dataset(path, "train", make_tokenizer(), 64, 32)
    assert str(e.value) == (f"{path}: row 2 (0-based): field 'prompt' differs from the user turn that 'chosen' and "
                            "'rejected' repeat (first difference at character 2: '2+3=' vs '2+2=')")


@pytest.mark.parametrize("chosen, rejected, prompt, message", [
    ([user("hi"), assistant("a")], [assistant("b")], "hi",
     "field 'chosen' repeats the prompt's turns and 'rejected' does not; give both as whole conversations, or both "
     "as the assistant's turns only"),
    ([user("hi"), assistant("a")], [user("ho"), assistant("b")], "hi",
     "fields 'chosen' and 'rejected' repeat different prompt turns (message 0: first difference at character 1: "
     "'hi' vs 'ho')"),
    ([system("s"), assistant("x"), assistant("a")], [system("s"), assistant("x"), assistant("b")], "hi",
     "field 'prompt' is given, but the turns 'chosen' and 'rejected' share hold no user turn"),
    ([user("hi"), assistant("a")], [user("hi"), assistant("b")], [system("s"), user("hi")],
     "field 'prompt' message 0 (system) differs from the turn 'chosen' and 'rejected' repeat there (a user turn: "
     "first difference at character 0: 's' vs 'hi')"),
])
def test_h4_shape_errors(chosen, rejected, prompt, message):
    with pytest.raises(DataError) as e:
        normalise(prompt, chosen, rejected)
    assert str(e.value) == message


def test_whitespace_around_a_repeated_prompt_is_no_disagreement():
    pair = normalise(" 1+2=\n", [user("1+2="), assistant("3")], [user("1+2="), assistant("4")])
    assert pair == {"prompt": [user("1+2=")], "chosen": [assistant("3")], "rejected": [assistant("4")], "text": False}
