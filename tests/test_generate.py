"""dpo-train generate on the tiny model: prompts tokenized as training tokenizes them, sampling checked
against greedy generation and for its seeds, each judge (the answer rule, a function, a reward model)
against an independent computation, pairing and its counts worked by hand, the pairs file trained on
as it is, and a judge that fails on a row: one line naming it, nothing written."""

import json
import math
import shutil

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
from typer.testing import CliRunner

from conftest import CHATML, arithmetic_pairs, make_tokenizer, write_jsonl
from dpo_train.cli import app
from dpo_train.config import ConfigError, load_config
from dpo_train.evaluate import generate as greedy
from dpo_train.generate import generate_pairs
from dpo_train.judges import AnswerJudge, JudgeError, RewardModelJudge
from dpo_train.models import ModelError, load_model
from dpo_train.pairs import ALL_EQUAL, TOO_FEW, make_pairs
from dpo_train.prompts import Prompt, load_prompts
from dpo_train.rows import DataError
from dpo_train.sampling import HFSampler, choose_backend
from dpo_train.tokenization import tokenize_pair
from dpo_train.trainer import train
from test_trainer import read_metrics

JUDGES = '''
def digits(prompt, completion, row):
    return sum(c.isdigit() for c in completion)

def fails_on_row_3(prompt, completion, row):
    if row["id"] == 3:
        raise ValueError("cannot score this")
    return 1.0

def text(prompt, completion, row):
    return "high"
'''


@pytest.fixture
def prompts_file(tmp_path):
    """12 prompt-only rows with an answer and an id."""
    rows = [{"prompt": r["prompt"], "answer": r["answer"], "id": i} for i, r in enumerate(arithmetic_pairs(12, 3))]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def gen_config(tmp_path, model_dir, prompts, *overrides):
    (tmp_path / "judges.py").write_text(JUDGES)
    path = tmp_path / "gen.yaml"
    path.write_text(f"""
model: {{name_or_path: {model_dir}}}
data: {{train: {prompts}, max_length: 64, max_prompt_length: 32}}
train: {{output_dir: {tmp_path / 'run'}, seed: 0}}
generate: {{num_samples: 4, max_new_tokens: 6, batch_size: 5, judge: function,
            judge_function: {tmp_path / 'judges.py'}:digits}}
""")
    return load_config(path, list(overrides))


def read_pairs(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("template", ["auto", "none"])
def test_prompts_are_tokenized_as_training_tokenizes_them(tmp_path, tiny_model_dir, template):
    rows = [{"prompt": "12+30=", "chosen": "42", "rejected": "41"}, {"prompt": "x" * 50, "chosen": "a", "rejected": "b"}]
    config = gen_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "rows.jsonl", rows),
                        f"data.chat_template={template}", "data.max_prompt_length=20")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = load_prompts(config.data, tokenizer, 0)
    for prompt, row in zip(prompts, rows):  # the second prompt is cut from the left, as in training
        assert prompt.ids == tokenize_pair(row, tokenizer, 64, 20, None if template == "none" else "auto")["prompt_ids"]
    assert prompts[0].where.endswith("rows.jsonl: row 0 (0-based)") and prompts[1].row["chosen"] == "a"


def test_sampling_with_top_k_1_is_greedy_generation_and_seeds_matter(tmp_path, tiny_model_dir, prompts_file):
    """Left padding, K copies per prompt and decoding are right: top_k=1 sampling of a batch of prompts of
    different lengths gives K copies of each prompt's greedy completion, generated one prompt at a time."""
    config = gen_config(tmp_path, tiny_model_dir, prompts_file, "generate.top_k=1", "generate.max_new_tokens=8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(str(tiny_model_dir), "float32").eval()
    ids = [p.ids for p in load_prompts(config.data, tokenizer, 0)][:5] + [tokenizer("1+1=")["input_ids"]]
    assert len(set(map(len, ids))) > 1
    sampled = HFSampler(model, tokenizer, config.generate)(ids, seed=1)
    assert sampled.texts == [[greedy(model, tokenizer, [p], 8, show=False)[0]] * 4 for p in ids]
    free = HFSampler(model, tokenizer, gen_config(tmp_path, tiny_model_dir, prompts_file).generate)
    assert free(ids, seed=1).texts == free(ids, seed=1).texts != free(ids, seed=2).texts
    # a checkpoint's own generation_config.json changes nothing: the settings are all that runs
    shutil.copytree(tiny_model_dir, tmp_path / "opinionated")
    (tmp_path / "opinionated" / "generation_config.json").write_text(json.dumps({"min_p": 0.9, "top_k": 2}))
    opinionated = load_model(str(tmp_path / "opinionated"), "float32").eval()
    assert opinionated.generation_config.min_p == 0.9
    sampler = HFSampler(opinionated, tokenizer, gen_config(tmp_path, tiny_model_dir, prompts_file).generate)
    assert sampler(ids, seed=1).texts == free(ids, seed=1).texts


def test_generate_writes_pairs_that_train_as_they_are(tmp_path, tiny_model_dir, prompts_file, tiny_data):
    settings = generate_pairs(gen_config(tmp_path, tiny_model_dir, prompts_file))
    out = tmp_path / "run" / "pairs.jsonl"
    pairs = read_pairs(out)
    digits = lambda text: sum(c.isdigit() for c in text)
    for pair in pairs:  # the judge's scores, recomputed; best against worst
        assert (pair["chosen_score"], pair["rejected_score"]) == (digits(pair["chosen"]), digits(pair["rejected"]))
        assert pair["chosen_score"] == max(pair["scores"]) > pair["rejected_score"] == min(pair["scores"])
        assert len(pair["scores"]) == 4 and pair["answer"] == str(eval(pair["prompt"][:-1]))
    counts = settings["counts"]
    assert counts["pairs"] == len(pairs) > 0 and counts["completions"] == 48
    assert counts["pairs"] + sum(counts["prompts_dropped"].values()) == 12
    recorded = yaml.safe_load((tmp_path / "run" / "pairs.generation.yaml").read_text())
    assert recorded["sampling"] == {"num_samples": 4, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0,
                                    "top_k": 0, "batch_size": 5, "seed": 0}
    assert recorded["counts"] == counts and recorded["completions_per_s"] > 0 and recorded["backend"] == "hf"
    first = out.read_bytes()
    generate_pairs(gen_config(tmp_path, tiny_model_dir, prompts_file))
    assert out.read_bytes() == first  # seeded: the same pairs again
    generate_pairs(gen_config(tmp_path, tiny_model_dir, prompts_file, "generate.seed=1"))
    assert out.read_bytes() != first

    from test_trainer import tiny_config
    results = train(tiny_config(tmp_path, tiny_model_dir, tiny_data, f"data.train={out}", "train.max_steps=2",
                                f"train.output_dir={tmp_path / 'trained'}"))
    records = [r for r in read_metrics(tmp_path / "trained") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and "policy" in results


def test_pairing_worked_by_hand():
    prompts = [Prompt(f"p{i}", {"answer": None}, [1], f"row {i}") for i in range(4)]
    completions = [["a", "b", "c", "d"], ["x", "y", "z", "w"], ["", " ", "x", "y"], ["", "x", "\n", "  "]]
    scores = [[1, 3, 3, 0], [2, 2, 2, 2], [5, 5, 1, 1], [0, 1, 2, 3]]
    rows, counts = make_pairs(prompts, completions, scores, "best_worst")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p0", "b", "d")]
    assert counts["prompts_dropped"] == {ALL_EQUAL: 2, TOO_FEW: 1} and counts["blank_completions"] == 5
    rows, counts = make_pairs(prompts, completions, scores, "all_pairs")
    assert sorted((r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "p0") == \
        [("a", "d"), ("b", "a"), ("b", "d"), ("c", "a"), ("c", "d")]
    assert counts["tied_pairs_dropped"] == 1 + 6 + 1 and counts["pairs"] == 5  # (b, c); all of p1; (x, y) of p2
    assert counts["prompts_dropped"] == {ALL_EQUAL: 2, TOO_FEW: 1}


def test_the_answer_judge_checks_answers_as_the_evaluation_does(tmp_path, tiny_model_dir):
    prompt = Prompt("2+5=", {"answer": "7"}, [1], "row 0")
    assert AnswerJudge().score([prompt], [["7", " 7. ", "seven", "17", "7\n"]]) == [[1.0, 1.0, 0.0, 0.0, 1.0]]
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2="}]
    config = gen_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", rows), "generate.judge=answer",
                        "generate.judge_function=null")
    with pytest.raises(JudgeError, match=r"p.jsonl: row 2 \(0-based\): generate.judge answer needs an 'answer'"):
        generate_pairs(config)


@pytest.mark.parametrize("judge, message", [
    ("fails_on_row_3", r"prompts.jsonl: row 3 \(0-based\): generate.judge_function .*:fails_on_row_3 failed: "
                       r"ValueError: cannot score this$"),
    ("text", r"prompts.jsonl: row 0 \(0-based\): generate.judge_function .*:text returned 'high', not a finite number$")])
def test_a_judge_that_fails_on_a_row_is_one_line_and_nothing_is_written(tmp_path, tiny_model_dir, prompts_file,
                                                                         judge, message):
    gen_config(tmp_path, tiny_model_dir, prompts_file)  # writes gen.yaml and judges.py
    result = CliRunner().invoke(app, ["generate", "--config", str(tmp_path / "gen.yaml"),
                                      f"generate.judge_function={tmp_path / 'judges.py'}:{judge}"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and __import__("re").search(message, errors[0]), result.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_judge_that_scores_everything_alike_leaves_no_pairs(tmp_path, tiny_model_dir, prompts_file):
    with pytest.raises(DataError, match=r"no pairs: 12 prompts, 48 completions .*all completions scored the same"):
        generate_pairs(gen_config(tmp_path, tiny_model_dir, prompts_file,
                                  f"generate.judge_function={tmp_path / 'judges.py'}:fails_on_row_3",
                                  "data.train=" + write_jsonl(tmp_path / "few.jsonl", [{"prompt": "1+1=", "id": 0}] * 12)))


def make_reward_model(path, num_labels: int = 1):
    """A tiny Llama classifier with weights large enough (initializer_range 0.2) that padding leaking
    into a score would show."""
    tokenizer = make_tokenizer(CHATML)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=1,
                         initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_the_reward_model_judge_scores_each_conversation_as_an_unpadded_forward(tmp_path, tiny_model_dir, prompts_file):
    path = make_reward_model(tmp_path / "rm")
    model, tokenizer = LlamaForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    def alone(prompt: str, completion: str) -> float:  # the classifier head on the last token's hidden state
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            return model.score(model.model(ids).last_hidden_state[0, -1]).item()

    prompts = [Prompt("1+1=", {}, [1], "row 0"), Prompt("12+30=", {}, [1], "row 1")]
    completions = [["2", "a much longer completion"], ["42", "x"]]
    scores = RewardModelJudge(str(path), "cpu", batch_size=3).score(prompts, completions)
    expected = [[alone(p.given, c) for c in texts] for p, texts in zip(prompts, completions)]
    flat = [s for row in scores for s in row]
    assert flat == pytest.approx([s for row in expected for s in row], abs=1e-5) and len(set(flat)) == 4

    settings = generate_pairs(gen_config(tmp_path, tiny_model_dir, prompts_file, "generate.judge=reward_model",
                                         "generate.judge_function=null", f"generate.judge_model={path}"))
    pairs = read_pairs(tmp_path / "run" / "pairs.jsonl")
    assert settings["counts"]["pairs"] == len(pairs) and settings["counts"]["prompts_dropped"][ALL_EQUAL] == 0
    for pair in pairs[:3]:
        assert pair["chosen_score"] == pytest.approx(alone(pair["prompt"], pair["chosen"]), abs=1e-5)
        assert pair["rejected_score"] == pytest.approx(alone(pair["prompt"], pair["rejected"]), abs=1e-5)

    with pytest.raises(ModelError, match="a reward model has one output, this one has 2"):
        RewardModelJudge(str(make_reward_model(tmp_path / "rm2", num_labels=2)), "cpu")


def test_vllm_is_chosen_only_where_it_can_run():
    if __import__("importlib").util.find_spec("vllm") is not None or torch.cuda.is_available():
        pytest.skip("vLLM or a GPU is here: the refusals below do not apply")
    assert choose_backend("auto", 1) == choose_backend("hf", 1) == "hf"
    with pytest.raises(ConfigError, match=r"generate.backend: vllm cannot run: vllm is not installed"):
        choose_backend("vllm", 1)


@pytest.mark.parametrize("override, message", [
    ("generate.num_samples=1", "generate.num_samples: must be >= 2"),
    ("generate.judge=reward_model", "generate.judge_model: is required with generate.judge: reward_model"),
    ("generate.judge_function=nocolon", "generate.judge_function: must be MODULE:FUNCTION"),
    ("generate.temperature=0", "generate.temperature: must be > 0"),
    ("generate.output=pairs.csv", "generate.output: must be a .jsonl file"),
    ("generate.judge=answr", "generate.judge: must be one of answer, reward_model, function")])
def test_generate_settings_are_checked_when_the_config_loads(tmp_path, tiny_model_dir, prompts_file, override, message):
    with pytest.raises(ConfigError, match=message):
        gen_config(tmp_path, tiny_model_dir, prompts_file, override)
