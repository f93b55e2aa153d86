import numpy as np
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
