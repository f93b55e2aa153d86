"""Chat templates beyond ChatML: Qwen3's real template (tests/fixtures/qwen3_chat_template.jinja, a
thinking template), its keyword arguments (data.chat_template_kwargs), a row's tools, the split where the
template renders a prompt differently once an answer follows, and tokenizing as TRL does."""

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import CHATML, make_tokenizer, write_jsonl
from dpo_train.cli import app
from dpo_train.tokenization import encode
from dpo_train.templates import render

QWEN3 = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()
TURN = lambda role, text: [{"role": role, "content": text}]
PLAIN = {"prompt": TURN("user", "2+2?"), "chosen": TURN("assistant", "4"), "rejected": TURN("assistant", "5")}
# a chosen answer that carries its reasoning, as thinking models write it
REASONED = {**PLAIN, "chosen": TURN("assistant", "<think>\nadd them\n</think>\n\n4")}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
HEADER = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def texts(row, **kwargs):
    return render({**row, "text": False}, make_tokenizer(), QWEN3, **kwargs)


def test_qwen3_renders_a_plain_pair_as_generation_would():
    """Without arguments Qwen3's prompt ends at the assistant header; the answer's turn then opens with an
    empty thought block, which is the completion's start (it continues the prompt)."""
    prompt, chosen, rejected, apart = texts(PLAIN)
    assert (prompt, chosen, rejected, apart) == (HEADER, "<think>\n\n</think>\n\n4<|im_end|>\n",
                                                 "<think>\n\n</think>\n\n5<|im_end|>\n", False)


def test_enable_thinking_false_reaches_the_template():
    prompt, chosen, rejected, apart = texts(PLAIN, template_kwargs={"enable_thinking": False})
    assert prompt == HEADER + "<think>\n\n</think>\n\n" and (chosen, rejected, apart) == ("4<|im_end|>\n",
                                                                                          "5<|im_end|>\n", False)


def test_a_prompt_rendered_differently_once_the_answer_follows_splits_as_the_full_rendering():
    """enable_thinking false ends the prompt with an empty thought block, but the reasoned answer's full
    rendering holds its own: the prompt alone is no prefix of it. The split follows the full renderings:
    the prompt is what both show before the answers differ from an answer-shaped placeholder's rendering."""
    prompt, chosen, rejected, apart = texts(REASONED, template_kwargs={"enable_thinking": False})
    assert apart and prompt == HEADER + "<think>\n"
    assert chosen == "add them\n</think>\n\n4<|im_end|>\n" and rejected == "\n</think>\n\n5<|im_end|>\n"
    full = render({**REASONED, "text": False}, make_tokenizer(), QWEN3)  # the default renders it whole
    assert not full[3] and full[1] == "<think>\nadd them\n</think>\n\n4<|im_end|>\n"


def test_a_rows_tools_reach_the_template_as_a_list_or_as_json_text(tmp_path):
    from dpo_train.data import build_dataset
    tokenizer = make_tokenizer()
    (tmp_path / "qwen3.jinja").write_text(QWEN3)
    for tools in (TOOLS, json.dumps(TOOLS)):
        pair, ids = encode({**PLAIN, "tools": tools}, tokenizer, 2048, 1024, QWEN3, None)
        prompt = tokenizer.decode(ids["prompt_ids"])
        assert prompt.startswith("<|im_start|>system\n# Tools") and '"name": "add"' in prompt
        assert prompt.endswith(HEADER)
        data = write_jsonl(tmp_path / "tools.jsonl", [{**PLAIN, "tools": tools}])  # a column of a data file too
        pairs, _, _ = build_dataset(data, "train", tokenizer, 2048, 1024, chat_template=str(tmp_path / "qwen3.jinja"))
        assert pairs[0]["prompt_ids"] == ids["prompt_ids"]


def test_trl_tokenization_scores_what_the_template_writes_after_the_end_of_turn():
    """TRL 1.16 tokenizes prompt and whole conversation with the template and scores every token after
    the shared prefix: ChatML's "\\n" after <|im_end|> too (trl.data_utils' own helpers, as TRL calls them)."""
    from trl.data_utils import _tokenize, common_prefix_length
    tokenizer = make_tokenizer(CHATML)
    _, ours = encode(PLAIN, tokenizer, 512, 512, CHATML, None)
    _, like_trl = encode(PLAIN, tokenizer, 512, 512, CHATML, None, trl_tokenization=True)
    prompt_ids = _tokenize(tokenizer, PLAIN["prompt"], add_generation_prompt=True, tools=None)["input_ids"]
    full = [_tokenize(tokenizer, PLAIN["prompt"] + PLAIN[side], tools=None)["input_ids"] for side in ("chosen", "rejected")]
    shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
    assert like_trl["prompt_ids"] == prompt_ids[:shared] == ours["prompt_ids"]
    assert [like_trl["chosen_ids"], like_trl["rejected_ids"]] == [ids[shared:] for ids in full]
    newline, eos = tokenizer.convert_tokens_to_ids("\n"), tokenizer.eos_token_id
    assert like_trl["chosen_ids"] == ours["chosen_ids"] + [newline] and ours["chosen_ids"][-1] == eos


def test_check_data_counts_the_pairs_rendered_apart(tmp_path):
    """check-data says how many pairs' prompts the template renders differently once the answer follows."""
    model = tmp_path / "model"
    make_tokenizer().save_pretrained(model)
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3)
    train = write_jsonl(tmp_path / "train.jsonl", [REASONED, PLAIN, REASONED])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {model}}}\ndata: {{train: {train}, chat_template: {template}, "
                      f"chat_template_kwargs: {{enable_thinking: false}}}}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    result = CliRunner().invoke(app, ["check-data", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "rendered apart: 2 pairs" in result.stdout and "template arguments {'enable_thinking': False}" in result.stdout
