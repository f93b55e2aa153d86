"""Parity with images: dpo-train against TRL 1.16's DPOTrainer on a tiny vision-language model, step for step.

Both train the same tiny LLaVA (tests/vlms.py: CLIP tower, Llama text model, random weights, CLIP's PIL image
processor) on the same image pairs in TRL's vision shape (one or two images per prompt), each tokenizing them
its own way: TRL with its vision collator, dpo-train with `data.trl_tokenization: true` (each completion's text
tokenized whole, as TRL's collator does, so both score the same tokens). The rest is scripts/parity.py's setup
(fp32 CPU, dropout off, AdamW lr 1e-5, cosine without warmup, clip 1.0, one batch of the same pairs each step).
dpo-train runs the packed layout, where each pair's images pass through the vision tower once; TRL passes them
twice.

    python scripts/parity_vision.py --pairs 4 --steps 3
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
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

from parity import run_ours  # noqa: E402


def run_trl(model, processor, rows: list[dict], folder: Path, args, out: Path) -> list[dict]:
    """TRL's DPOTrainer on the rows, their images opened as PIL images."""
    import torch
    from datasets import Dataset
    from PIL import Image as PIL
    from trl import DPOConfig, DPOTrainer
    from dpo_train.images import with_parts
    from dpo_train.rows import normalise

    def parts(row):  # Arrow holds one type per column: every content as parts, images placed where TRL places them
        pair = with_parts(normalise(row["prompt"], row["chosen"], row["rejected"]), len(row["images"]))
        return {key: [{"role": t["role"], "content": [{"type": p["type"], "text": p["text"]} for p in t["content"]]}
                      for t in pair[key]] for key in ("prompt", "chosen", "rejected")}
    dataset = Dataset.from_list([{"images": [PIL.open(folder / path).convert("RGB") for path in r["images"]], **parts(r)}
                                 for r in rows])
    config = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=args.pairs, max_steps=args.steps,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
                       gradient_checkpointing=False, dataloader_num_workers=0, disable_dropout=True, beta=args.beta,
                       max_length=None, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=copy.deepcopy(model).train(), ref_model=copy.deepcopy(model), args=config,
                         train_dataset=dataset, processing_class=processor)
    torch.manual_seed(0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]
    return [{"loss": h["loss"], "margins": h["rewards/margins"], "logps": h["logps/chosen"]} for h in logs]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", help="a tests/vlms.py family")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--layout", default="packed", choices=["packed", "rows", "padded"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    from vlms import VLMS, image_rows, save
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="parity-vision-"))
    try:
        checkpoint = save(args.family, work / args.family)
        model, processor = VLMS[args.family]()  # the same weights (seed 0) as the checkpoint
        rows = image_rows(args.pairs, work)
        for row in rows:
            row.pop("answer")
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / "ours").mkdir()
        # scripts/parity.py's run, with room for the image tokens and each completion tokenized whole, as TRL's
        # vision collator does
        settings = argparse.Namespace(**vars(args), max_length=1024, max_prompt_length=512, trl_tokenizes=True)
        ours = run_ours(str(checkpoint), data, "sigmoid", settings, work / "ours")
        trl = run_trl(model, processor, rows, work, args, work)
    finally:
        shutil.rmtree(work)
    steps = list(zip(ours, trl))
    result = {"ours": ours, "trl": trl, "max_loss_difference": max(abs(o["loss"] - t["loss"]) for o, t in steps),
              "max_margin_difference": max(abs(o["margins"] - t["margins"]) for o, t in steps),
              "max_logps_difference": max(abs(o["logps"] - t["logps"]) for o, t in steps)}
    print(f"{'step':>5s}{'TRL loss':>13s}{'ours':>13s}{'diff':>11s}{'TRL logps/c':>13s}{'ours':>10s}")
    for step, (o, t) in enumerate(steps):
        print(f"{step:5d}{t['loss']:13.7f}{o['loss']:13.7f}{o['loss'] - t['loss']:11.2e}{t['logps']:13.4f}{o['logps']:10.4f}")
    print("PARITY-VISION " + json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(int(main()["max_loss_difference"] > 1e-4))
