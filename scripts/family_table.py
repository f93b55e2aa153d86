"""The table of docs/model-families.md: for each family of tests/families.py (a tiny model built locally,
initializer_range 0.2, windows of 8 tokens), each layout forced (whatever the decision would pick), the
step-0 log-probs against a naive forward of each sequence alone (max relative difference, fp32), and with
--grads one step's gradients against the padded layout's; and the layout the run uses when `packed` is
asked for (layouts.choose).

    python scripts/family_table.py                       # every family, CPU
    python scripts/family_table.py --families gemma2,gpt_oss --grads --device cuda   # FlexAttention on a GPU
    python scripts/family_table.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("packed", "rows", "padded")


def measure(family: str, device: str, grads: bool) -> dict:
    import torch
    from conftest import make_tokenizer
    from families import (gradient_difference, layout_gradients, layout_logps, make_family_model, naive_logps,
                          relative_difference, tokenized_pairs)
    from dpo_train import layouts
    tokenizer = make_tokenizer()
    pairs = tokenized_pairs(tokenizer)
    model = make_family_model(family, len(tokenizer)).to(device)
    with torch.no_grad():
        naive = naive_logps(model, pairs).cpu()
    row = {"family": family, "model": type(model).__name__, "used": layouts.choose("packed", [model])}
    for layout in LAYOUTS:
        try:
            with torch.no_grad():
                row[layout] = relative_difference(layout_logps(model, pairs, layout).cpu(), naive)
        except Exception as error:  # noqa: BLE001 (a crash is a finding of the table)
            row[layout] = f"crash: {type(error).__name__}"
    if grads:
        padded = layout_gradients(model, pairs, "padded")
        for layout in ("packed", "rows"):
            if isinstance(row[layout], float):
                row[f"{layout}_grads"] = gradient_difference(layout_gradients(model, pairs, layout), padded)
    return row


def cell(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated (default: all of tests/families.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grads", action="store_true", help="also one step's gradients against padded's")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    from families import FAMILIES
    rows = []
    print("| family | model | used for `packed` | packed | rows | padded |" + (" packed grads | rows grads |" if args.grads else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if args.grads else ""))
    for family in (args.families.split(",") if args.families else FAMILIES):
        row = measure(family, args.device, args.grads)
        rows.append(row)
        used = row["used"][0] + (f" ({row['used'][1]})" if row["used"][1] else "")
        extra = f" {cell(row.get('packed_grads', '–'))} | {cell(row.get('rows_grads', '–'))} |" if args.grads else ""
        print(f"| {family} | {row['model']} | {used} | {cell(row['packed'])} | {cell(row['rows'])} | "
              f"{cell(row['padded'])} |{extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
