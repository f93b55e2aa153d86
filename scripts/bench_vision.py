"""Throughput and peak memory on image-heavy pairs: dpo-train against TRL's DPOTrainer, side by side.

Both train the same LLaVA-shaped model, built here with random weights (a CLIP vision tower, a Llama text
model, CLIP's PIL image processor: no downloads), on the same pairs in TRL's vision shape: two 224 x 224
images a prompt (196 image tokens each), a short question and short answers, so that the images are most of
each pair's tokens and the vision tower most of the work. Each run is a fresh process (peak RSS is its own),
the trainers alternate (ours, TRL, ours, TRL, ...), the first step of each run is a warm-up and is not timed.
dpo-train runs the packed layout (each pair's prompt and images once); TRL runs the prompt and images once
with each answer. Settings are scripts/bench.py's: fp32, the same batch, lr 1e-6, gradient checkpointing off.

    pip install -e ".[bench]"
    python scripts/bench_vision.py                       # 4 pairs a step, 3 timed steps, 1 round
    python scripts/bench_vision.py --batch 8 --repeats 2 --layouts packed,padded

tokens/s counts each pair's prompt (image tokens included) + chosen + rejected tokens once, per second of
training, the same count for both trainers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

from bench import peak_memory_mb, step_timer  # noqa: E402

IMAGE_SIZE, PATCH = 224, 16  # 14 x 14 = 196 image tokens an image


def build_model(path: Path, width: int, layers: int) -> None:
    """A LLaVA-shaped model (CLIP tower and Llama text model, `width` wide and `layers` deep each) and its
    processor, saved as a checkpoint in `path`."""
    import torch
    import transformers as T
    from vlms import template, tokenizer
    tok = tokenizer(["<image>"])
    processor = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                 tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template("<image>"))
    heads = width // 64
    vision = T.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = T.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                           vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    T.AutoModelForImageTextToText.from_config(config, dtype=torch.float32).save_pretrained(path)
    processor.save_pretrained(path)


def make_pairs(folder: Path, n: int, images: int) -> list[dict]:
    """n pairs in TRL's vision shape, `images` random 224 x 224 pictures each (PNG files in `folder`), the same
    question and answer lengths in every pair, so every step has the same tokens."""
    from vlms import image
    rows = []
    for i in range(n):
        paths = [f"image-{i}-{j}.png" for j in range(images)]
        for j, name in enumerate(paths):
            image(100 * i + j, (IMAGE_SIZE, IMAGE_SIZE)).save(folder / name)
        rows.append({"images": paths,
                     "prompt": [{"role": "user", "content": [{"type": "image"}] * images +
                                 [{"type": "text", "text": f"What differs between these? ({i % 10})"}]}],
                     "chosen": [{"role": "assistant", "content": f"The second one is brighter. ({i % 10})"}],
                     "rejected": [{"role": "assistant", "content": f"They are the same picture. ({i % 10})"}]})
    return rows


def pair_tokens(checkpoint: Path, data: Path) -> float:
    """Mean prompt (image tokens included) + chosen + rejected tokens per pair, as dpo-train tokenizes them."""
    from transformers import AutoProcessor
    from dpo_train.data import build_dataset
    from dpo_train.vision import Vision
    processor = AutoProcessor.from_pretrained(checkpoint)
    pairs, _, _ = build_dataset(str(data), "train", processor.tokenizer, 2048, 2047, vision=Vision(processor))
    return statistics.mean(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def run_ours(args, layout: str) -> dict:
    from dpo_train.config import load_config
    from dpo_train.trainer import train
    out = Path(tempfile.mkdtemp())
    config = out / "bench.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": args.checkpoint},
        "data": {"train": args.data, "max_length": 2048, "max_prompt_length": 2047},
        "train": {"output_dir": str(out / "run"), "per_device_batch_size": args.batch, "learning_rate": 1e-6,
                  "max_steps": args.steps + 1, "layout": layout, "eval_max_new_tokens": 0, "seed": 0}}))
    train(load_config(config))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # the trained model: not needed
    return {"seconds_per_token": statistics.mean(1 / r["tokens/s"] for r in records if r["step"] >= 1),
            "peak_mb": peak_memory_mb()}


def run_trl(args) -> dict:
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    timer, step_times = step_timer()
    folder = Path(args.data).parent
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    text = lambda turns: [{"role": t["role"], "content": t["content"] if isinstance(t["content"], list) else
                           [{"type": "text", "text": t["content"]}]} for t in turns]
    dataset = Dataset.from_list([{"images": [Image.open(folder / p).convert("RGB") for p in r["images"]],
                                  **{k: text(r[k]) for k in ("prompt", "chosen", "rejected")}} for r in rows])
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps + 1,
                       learning_rate=1e-6, beta=0.1, max_length=None, logging_steps=1, report_to=[], save_strategy="no",
                       use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, gradient_checkpointing=False)
    trainer = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(args.checkpoint), args=config,
                         train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(args.checkpoint),
                         callbacks=[timer])
    trainer.train()
    return {"seconds_per_step": statistics.mean(step_times[1:]), "peak_mb": peak_memory_mb()}


def run_worker(args, name: str) -> dict:
    """`name` (trl, or ours-LAYOUT) trained in a fresh process; its result."""
    cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", args.checkpoint, "--data", args.data,
           "--batch", str(args.batch), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("BENCH "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--width", type=int, default=256, help="hidden size of the vision tower and the text model")
    parser.add_argument("--layers", type=int, default=4, help="layers of each")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds")
    parser.add_argument("--layouts", default="packed", help="our layouts, comma-separated: packed, rows, padded")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_trl(args) if args.worker == "trl" else run_ours(args, args.worker.removeprefix("ours-"))
        return print("BENCH " + json.dumps(result), flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    trainers = [f"ours-{layout}" for layout in args.layouts.split(",")] + ["trl"]
    results = {name: [] for name in trainers}
    try:
        build_model(work / "model", args.width, args.layers)
        (work / "data").mkdir()
        data = work / "data" / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(work / "data", args.batch * (args.steps + 1),
                                                                         args.images)))
        args.checkpoint, args.data = str(work / "model"), str(data)
        tokens_per_pair = pair_tokens(work / "model", data)
        for _ in range(args.repeats):
            for name in trainers:  # alternate, so drifts in machine speed hit every trainer alike
                results[name].append(run_worker(args, name))
    finally:
        shutil.rmtree(work)
    rows = []
    for name, runs in results.items():
        step_seconds = (statistics.median(r["seconds_per_step"] for r in runs) if name == "trl" else
                        statistics.median(r["seconds_per_token"] for r in runs) * tokens_per_pair * args.batch)
        rows.append({"trainer": name, "batch": args.batch, "tokens_per_pair": tokens_per_pair,
                     "tokens/s": tokens_per_pair * args.batch / step_seconds, "peak_mb": max(r["peak_mb"] for r in runs)})
    trl = rows[-1]
    print(f"\nLLaVA-shaped, width {args.width}, {args.layers} + {args.layers} layers, {args.images} images of "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} a prompt, {tokens_per_pair:.0f} tokens a pair, fp32, {args.steps} timed steps, "
          f"{args.repeats} round(s)")
    print(f"{'trainer':14s}{'pairs':>6s}{'tokens/s':>10s}{'peak MB':>9s}{'tok/s vs TRL':>14s}{'mem vs TRL':>12s}")
    for row in rows:
        print(f"{row['trainer']:14s}{row['batch']:6d}{row['tokens/s']:10.1f}{row['peak_mb']:9.0f}"
              f"{row['tokens/s'] / trl['tokens/s']:14.2f}{row['peak_mb'] / trl['peak_mb']:12.2f}")
    print(json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
