"""Sources: file formats, dataset directories (save_to_disk too), split slices, mixtures drawn under
the seed, and tokenizing in several processes (cached, with the same one-line errors)."""

import os

import datasets
import numpy as np
import pytest

from conftest import make_tokenizer, write_jsonl
from dpo_train.config import Columns, Source
from dpo_train.data import build_dataset, processes, with_rows
from dpo_train.rows import DataError
from dpo_train.tokenization import tokenize_pair

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]


def prompts(kept) -> list[str]:
    return [turns[0]["content"] for turns in kept["prompt"]]


def write(tmp_path, kind: str, rows=ROWS) -> str:
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / {"jsonl": "d.jsonl", "json": "d.json", "parquet": "d.parquet"}.get(kind, kind)
    if kind == "jsonl":
        table.to_json(path)
    elif kind == "json":  # one JSON array
        table.to_json(path, lines=False)
    elif kind == "parquet":
        table.to_parquet(path)
    elif kind == "save_to_disk":
        table.save_to_disk(str(path))
    elif kind == "save_to_disk_dict":
        datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(path))
    elif kind == "data_dir":  # a folder of data files, one per split, as on the hub
        path.mkdir()
        table.to_json(path / "train.jsonl")
        table.select(range(3)).to_json(path / "test.jsonl")
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "save_to_disk", "save_to_disk_dict", "data_dir"])
@pytest.mark.parametrize("split, expected", [("train", list(range(10))), ("train[:3]", [0, 1, 2]),
                                             ("train[:30%]", [0, 1, 2]), ("train[80%:]", [8, 9]),
                                             ("test", None)])
def test_formats_and_split_slices(tmp_path, kind, split, expected):
    if expected is None:  # a file is one split: its name is not checked; a dataset folder has its own
        expected = list(range(10)) if kind in ("jsonl", "json", "parquet", "save_to_disk") else [0, 1, 2]
    _, kept, stats = build_dataset(write(tmp_path, kind), split, make_tokenizer(), 64, 32)
    assert prompts(kept) == [f"p{i}" for i in expected] and stats.rows == len(expected)


def test_an_unknown_split_of_a_dataset_folder_is_one_line(tmp_path):
    path = write(tmp_path, "save_to_disk_dict")
    with pytest.raises(DataError) as e:
        build_dataset(path, "validation", make_tokenizer(), 64, 32)
    assert str(e.value) == f"{path}: no split 'validation' (splits: train, test)"


def test_a_mixture_takes_rows_under_the_seed_and_counts_them(tmp_path):
    a = write(tmp_path, "jsonl")
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"q{i}", "chosen": "x", "rejected": "y"} for i in range(40)])
    mix = [Source(a, take=4), Source(b, take=0.25)]
    build = lambda seed, spec=mix: build_dataset(spec, "train", make_tokenizer(), 64, 32, seed=seed, key="data.train")
    _, kept, stats = build(0)
    # the draw: numpy's default_rng([seed, source index]), without replacement, kept in file order
    draw = lambda seed, index, n, k: sorted(np.random.default_rng([seed, index]).choice(n, k, replace=False).tolist())
    assert prompts(kept) == [f"p{i}" for i in draw(0, 0, 10, 4)] + [f"q{i}" for i in draw(0, 1, 40, 10)]
    assert stats.sources == [{"path": a, "split": "train", "available": 10, "rows": 4, "kept": 4},
                             {"path": b, "split": "train", "available": 40, "rows": 10, "kept": 10}]
    assert "sources: " + a + " 4 of 10 rows (4 kept), " + b + " 10 of 40 rows (10 kept)" in str(stats)
    assert prompts(build(0)[1]) == prompts(kept) and prompts(build(1)[1]) != prompts(kept)  # the seed decides
    assert [s.rows for s in with_rows(mix, stats)] == [4, 10] and mix[0].rows is None  # recorded in a copy
    with pytest.raises(DataError) as e:
        build(0, [Source(a, take=11)])
    assert str(e.value) == f"{a}: data.train[0].take: 11 rows asked for, but the source has 10"
    with pytest.raises(DataError) as e:  # a saved config's count that the data no longer gives
        build(0, [Source(a, take=0.5, rows=4)])
    assert str(e.value) == (f"{a}: data.train[0].rows: the config records 4 rows from this source, and it now gives 5: "
                            "the data changed (set rows: null to accept it)")


def test_sources_of_different_shapes_mix_each_tokenized_as_alone(tmp_path):
    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "4", "answer": 3}])
    h4 = write_jsonl(tmp_path / "h4.jsonl", [
        {"prompt": "2+2=", "chosen": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "5"}]}])
    se = write_jsonl(tmp_path / "se.jsonl", [{"question": "3+3=", "response_j": "6", "response_k": "7"}])
    mix = [Source(strings), Source(h4), Source(se, columns=Columns("question", "response_j", "response_k"))]
    tokenizer = make_tokenizer()
    pairs, kept, _ = build_dataset(mix, "train", tokenizer, 64, 32)
    alone = [tokenize_pair(r, tokenizer, 64, 32) for r in (
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "3+3=", "chosen": "6", "rejected": "7"})]
    assert list(pairs) == [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in alone]
    assert kept["text"] == [True, False, True] and kept["answer"] == ["3", None, None]  # answers as text, null where none


def test_default_processes():
    cores = len(os.sched_getaffinity(0))
    assert processes(None, 999) == 1  # small sets stay in this process
    assert processes(None, 10**6) == min(cores, 8)
    assert processes(3, 2) == 2 and processes(2, 10**6) == 2


def test_two_processes_tokenize_the_same_pairs_from_the_cache_and_report_bad_rows_alike(tmp_path):
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(40)]
    tokenizer = make_tokenizer()
    # two copies of the file, so that the second run cannot read the first one's cache
    one, _, _ = build_dataset(write_jsonl(tmp_path / "one.jsonl", rows), "train", tokenizer, 64, 32, num_proc=1)
    path = write_jsonl(tmp_path / "two.jsonl", rows)
    two, _, _ = build_dataset(path, "train", tokenizer, 64, 32, num_proc=2)
    assert list(one) == list(two)
    files = sorted(f["filename"] for f in two.cache_files)
    assert [f[-21:] for f in files] == ["_00000_of_00002.arrow", "_00001_of_00002.arrow"]  # one file per process
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    again, _, _ = build_dataset(path, "train", tokenizer, 64, 32, num_proc=2)
    assert list(again) == list(two) and sorted(f["filename"] for f in again.cache_files) == files
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps  # read from the cache, not written again
    # a bad row that only the second process sees (rows 20-39): the same one line, naming the row
    turn = lambda role, text: {"role": role, "content": text}
    h4 = [{"prompt": r["prompt"], "chosen": [turn("user", r["prompt"]), turn("assistant", r["chosen"])],
           "rejected": [turn("user", r["prompt"]), turn("assistant", r["rejected"])]} for r in rows]
    h4[35]["prompt"] = "35+2="
    path = write_jsonl(tmp_path / "bad.jsonl", h4)
    with pytest.raises(DataError) as e:
        build_dataset(path, "train", tokenizer, 64, 32, num_proc=2)
    assert str(e.value) == (f"{path}: row 35 (0-based): field 'prompt' differs from the user turn that 'chosen' and "
                            "'rejected' repeat (first difference at character 3: '35+2=' vs '35+1=')")


def test_a_runs_mixture_is_kept_in_its_config_and_checked_on_resume(tmp_path, tiny_data, monkeypatch):
    """A base model (no chat template) trained with the shipped chatml template on a mixture: the rows
    each source gave go into config.yaml, final/ keeps the template, and a source that now gives
    other rows stops the resume before any model loads."""
    import yaml
    from transformers import AutoTokenizer

    from conftest import make_model
    from dpo_train.checkpoint import CheckpointError
    from dpo_train.config import load_config
    from dpo_train.templates import CHATML
    from dpo_train.trainer import train

    base = tmp_path / "base"
    tokenizer = make_tokenizer(chat_template=None)
    make_model(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    extra = tmp_path / "extra.jsonl"
    write_jsonl(extra, [{"prompt": f"{i}*1=", "chosen": str(i), "rejected": "0"} for i in range(1, 9)])
    config = tmp_path / "mix.yaml"
    config.write_text(f"model: {{name_or_path: {base}}}\n"
                      f"data: {{train: [{{path: {tiny_data[0]}, take: 0.5}}, {extra}], chat_template: chatml, "
                      "max_length: 64, max_prompt_length: 48}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}, max_steps: 2, save_every: 1, per_device_batch_size: 4}}\n")
    train(load_config(config))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["train"]
    assert [(s["path"], s["take"], s["rows"]) for s in saved] == [(tiny_data[0], 0.5, 24), (str(extra), None, 8)]
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").chat_template == CHATML

    def forbidden(*args, **kwargs):
        raise AssertionError("the model loaded")
    monkeypatch.setattr("dpo_train.trainer.load_policy_and_reference", forbidden)
    original = extra.read_text()
    extra.write_text(original * 2)  # the source grew: 16 rows where the checkpoint's run had 8
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in data\.train, which changes"):
        train(load_config(config), resume="auto")
    extra.write_text(original)  # the data of the checkpoint's run: the resume goes ahead, to the model
    with pytest.raises(AssertionError, match="the model loaded"):
        train(load_config(config), resume="auto")
