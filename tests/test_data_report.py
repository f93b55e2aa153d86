import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_tokenizer, write_jsonl
from dpo_train.cli import app
from dpo_train.data import tokenize_pair
from dpo_train.data_report import percentile, render_pair

# With the conftest chat template and one token per character, a string prompt p renders as
# <|im_start|> user \n p <|im_end|> \n <|im_start|> assistant \n: len(p) + 19 tokens.


def test_percentile_is_nearest_rank():
    values = [5, 1, 9, 3, 7, 2, 8, 8]
    for q in (1, 12.5, 50, 90, 99, 100):
        assert percentile(values, q) == int(np.percentile(values, q, method="inverted_cdf")), q


def test_rendered_pair_marks_exactly_the_prompt_tokens():
    tokenizer = make_tokenizer()
    pair = tokenize_pair({"prompt": "1+2=", "chosen": "3", "rejected": "four"}, tokenizer, 64, 32)
    assert render_pair(pair, tokenizer) == [
        "  chosen: 25 tokens, 23 masked, 2 scored",  # 4 + 19 prompt tokens; "3" and EOS
        "    [[<|im_start|>user", "    1+2=<|im_end|>", "    <|im_start|>assistant", "    ]]3<|im_end|>",
        "  rejected: 28 tokens, 23 masked, 5 scored",
        "    [[<|im_start|>user", "    1+2=<|im_end|>", "    <|im_start|>assistant", "    ]]four<|im_end|>"]


def table_row(output: str, part: str) -> list[int]:
    line = next(line for line in output.splitlines() if line.split()[:1] == [part])
    return [int(n) for n in line.split()[1:]]


def test_check_data_reports_counts_lengths_and_an_example(tmp_path, tiny_model_dir):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "four"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "4"},  # dropped
            {"prompt": "x" * 30, "chosen": "yes", "rejected": "no"}]  # 49 prompt tokens, cut to 32
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: {train}, max_length: 64, "
                      f"max_prompt_length: 32}}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    result = CliRunner().invoke(app, ["check-data", "--config", str(config)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"train: {train}\n  rows 3: kept 2, dropped 1 (1 chosen == rejected)\n" in out
    assert "truncated: 1 prompts (cut from the left to data.max_prompt_length=32), 0 pairs" in out
    # kept pairs' token counts before truncation: prompts 23 and 49, chosen 2 and 4, rejected 5 and 3
    assert table_row(out, "prompt") == [23, 23, 49, 49, 49]  # min, p50, p90, p99, max
    assert table_row(out, "chosen") == [2, 2, 4, 4, 4]
    assert table_row(out, "rejected") == [3, 3, 5, 5, 5]
    assert "    ]]four<|im_end|>" in out and "eval:" not in out
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_check_data_reports_bad_data_in_one_line(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": None, "rejected": "b"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: {train}}}\ntrain: {{output_dir: o}}\n")
    result = CliRunner().invoke(app, ["check-data", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {train}: row 0 (0-based): field 'chosen' is null or missing"
    assert "Traceback" not in result.output


def check(tmp_path, model_dir, data: str, *overrides):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {model_dir}}}\ndata: {data}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    result = CliRunner().invoke(app, ["check-data", "--config", str(config), *overrides])
    assert result.exit_code == 0, result.output
    return result.stdout


def example(out: str, side: str = "chosen") -> list[str]:
    """The rendered lines of one side of the first example."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {side}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return lines[start:end]


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template (a base model)."""
    from conftest import make_model
    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = make_tokenizer(chat_template=None)
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_check_data_shows_what_the_model_sees_in_each_template_mode(tmp_path, tiny_model_dir, base_model_dir):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "four"}])
    data = f"{{train: {train}, max_length: 64, max_prompt_length: 48}}"
    auto = check(tmp_path, tiny_model_dir, data)
    assert f"tokenizer: {tiny_model_dir}; rendered with the tokenizer's chat template\n" in auto
    assert example(auto) == ["  chosen: 25 tokens, 23 masked, 2 scored", "    [[<|im_start|>user", "    1+2=<|im_end|>",
                             "    <|im_start|>assistant", "    ]]3<|im_end|>"]
    none = check(tmp_path, tiny_model_dir, data, "data.chat_template=none")
    assert "rendered with no chat template (data.chat_template: none): text as it is, EOS after each completion" in none
    assert example(none) == ["  chosen: 6 tokens, 4 masked, 2 scored", "    [[1+2=]]3<|im_end|>"]
    base = check(tmp_path, base_model_dir, data)  # auto, and the tokenizer has no template: text as it is
    assert "no chat template (the tokenizer has no chat template)" in base and example(base) == example(none)
    chatml = check(tmp_path, base_model_dir, data, "data.chat_template=chatml", "data.system_prompt=Be brief.")
    assert "rendered with the chatml chat template; system prompt 'Be brief.' where a prompt has none" in chatml
    # the system turn adds <|im_start|> system \n Be brief. <|im_end|> \n: 19 tokens to the 23 of the prompt
    assert example(chatml) == ["  chosen: 44 tokens, 42 masked, 2 scored", "    [[<|im_start|>system",
                               "    Be brief.<|im_end|>", "    <|im_start|>user", "    1+2=<|im_end|>",
                               "    <|im_start|>assistant", "    ]]3<|im_end|>"]
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    custom = check(tmp_path, base_model_dir, data, f"data.chat_template={jinja}")
    assert "rendered with the chat template in plain.jinja" in custom
    assert example(custom) == ["  chosen: 24 tokens, 22 masked, 2 scored", "    [[user: 1+2=<|im_end|>assistant: ]]3<|im_end|>"]


def test_check_data_reports_each_source_of_a_mixture(tmp_path, tiny_model_dir):
    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(8)])
    chats = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                               "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}] * 3)
    out = check(tmp_path, tiny_model_dir, f"{{train: [{{path: {strings}, take: 0.5}}, {chats}], max_length: 64, "
                                          "max_prompt_length: 48}")
    assert f"train: a mixture of 2 sources\n  [0] {strings} (train): 4 of its 8 rows, 4 kept\n  [1] {chats} (train): " \
           "3 of its 3 rows, 3 kept\n  rows 7: kept 7, dropped 0\n" in out
    assert f"example (the first kept pair of [0] {strings})" in out and f"example (the first kept pair of [1] {chats})" in out


def test_a_template_that_refuses_a_turn_is_one_line(tmp_path, base_model_dir):
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                      "supported') }}{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}")
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "four"}])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: {base_model_dir}}}\ndata: {{train: {train}, chat_template: {strict}, "
                      "system_prompt: Be brief.}\ntrain: {output_dir: o}\n")
    result = CliRunner().invoke(app, ["check-data", "--config", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {train}: row 0 (0-based): the chat template refuses these turns (system, user): System role not supported")
