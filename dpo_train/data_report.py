"""What `dpo-train check-data` prints: for each data file, the row counts, the token lengths before
truncation, what was truncated or dropped and why, and one pair rendered as the model sees it."""

from __future__ import annotations

import math
from itertools import groupby

from . import vision
from .config import Config, DataConfig
from .collate import IGNORE_INDEX, collate
from .data import DataStats, build_dataset, settings
from .models import load_tokenizer
from .rows import FIELDS
from .templates import describe as describe_template, resolve

PERCENTILES = (50, 90, 99)
PROMPT_OPEN, PROMPT_CLOSE = "[[", "]]"  # marks the tokens labelled -100 in the rendered example


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def length_table(full_lengths: dict[str, list[int]]) -> list[str]:
    """Min, percentiles and max of each part's token count, one line per part."""
    columns = ["min", *(f"p{q}" for q in PERCENTILES), "max"]
    lines = [f"{'tokens before truncation':28s}" + "".join(f"{c:>7s}" for c in columns)]
    for part in FIELDS:
        values = full_lengths[part]
        numbers = [min(values), *(percentile(values, q) for q in PERCENTILES), max(values)]
        lines.append(f"  {part:26s}" + "".join(f"{n:7d}" for n in numbers))
    return lines


def render_pair(pair: dict, tokenizer) -> list[str]:
    """Both rows of a tokenized pair, decoded, with the prompt tokens (label -100) inside [[ ]].

    The labels come from `collate`, so this shows exactly what the loss will and won't score.
    """
    batch = collate([pair], pad_token_id=tokenizer.pad_token_id)
    lines = []
    for row, side in enumerate(("chosen", "rejected")):
        length = int(batch["attention_mask"][row].sum())
        tokens = list(zip(batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()))
        scored = sum(label != IGNORE_INDEX for _, label in tokens)
        text = ""
        for masked, run in groupby(tokens, key=lambda token: token[1] == IGNORE_INDEX):
            piece = tokenizer.decode([i for i, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text += PROMPT_OPEN + piece + PROMPT_CLOSE if masked else piece
        lines.append(f"  {side}: {length} tokens, {length - scored} masked, {scored} scored")
        lines += ["    " + line for line in text.split("\n")]
    return lines


def image_lines(pairs) -> list[str]:
    """Images per kept pair, their sizes and their tokens in the prompt (min, percentiles, max)."""
    counts, tokens = [len(sizes) for sizes in pairs["image_sizes"]], pairs["image_tokens"]
    sizes = [size for row in pairs["image_sizes"] for size in row]
    spread = lambda values: f"min {min(values)}, " + ", ".join(f"p{q} {percentile(values, q)}" for q in PERCENTILES) \
        + f", max {max(values)}"
    lines = [f"  images: {sum(counts)} in {sum(n > 0 for n in counts)} of {len(counts)} pairs; per pair {spread(counts)}"]
    if sizes:
        pixels = [w * h for w, h in sizes]
        smallest, largest = sizes[pixels.index(min(pixels))], sizes[pixels.index(max(pixels))]
        lines.append(f"  image sizes (width x height): smallest {smallest[0]}x{smallest[1]}, largest "
                     f"{largest[0]}x{largest[1]}; image tokens per prompt: {spread(tokens)}")
    return lines


def describe(name: str, source, stats: DataStats, pairs, tokenizer, data: DataConfig) -> str:
    why = ", ".join(f"{n} {why}" for why, n in stats.dropped.items())
    lines = [f"{name}: {source if isinstance(source, str) else f'a mixture of {len(stats.sources)} sources'}"]
    if not isinstance(source, str):
        lines += [f"  [{i}] {s['path']} ({s['split']}): {s['rows']} of its {s['available']} rows, {s['kept']} kept"
                  for i, s in enumerate(stats.sources)]
    lines += [f"  rows {stats.rows}: kept {stats.kept}, dropped {stats.rows - stats.kept}" + (f" ({why})" if why else ""),
             f"  truncated: {stats.prompt_truncated} prompts (cut from the left to data.max_prompt_length="
             f"{data.max_prompt_length}), {stats.completion_truncated} pairs with a completion cut to fit "
             f"data.max_length={data.max_length}"]
    if stats.implicit_prompts:
        lines.append("  no 'prompt' field: prompts are the prefix chosen and rejected share")
    lines.append(f"  rendered apart: {stats.rendered_apart} pairs whose chat template renders the prompt differently "
                 "once the answer follows (their prompt is the one the full rendering shows)")
    lines += ["  " + line for line in length_table(stats.full_lengths)]
    if "images" in pairs.column_names:
        lines += image_lines(pairs)
    # the first kept pair of each source (a mixture's sources may differ in shape)
    first, examples = 0, []
    for i, given in enumerate(stats.sources):
        if given["kept"]:
            which = "the first kept pair" + (f" of [{i}] {given['path']}" if len(stats.sources) > 1 else "")
            examples += [f"  example ({which}); text in {PROMPT_OPEN} {PROMPT_CLOSE} is prompt: labelled -100, "
                         "not scored", *render_pair(pairs[first], tokenizer)]
        first += given["kept"]
    return "\n".join(lines + examples)


def check_data(config: Config) -> str:
    """Load and tokenize the config's train and eval data exactly as training would, without
    loading the model; return the report. Bad data raises DataError as in training."""
    d = config.data
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.init_kwargs)
    processor = vision.load(config.model.name_or_path, tokenizer, config.model.init_kwargs)  # a VLM's: it reads images
    rendering = describe_template(d.chat_template, resolve(d.chat_template, tokenizer))
    system = f"; system prompt {d.system_prompt!r} where a prompt has none" if d.system_prompt else ""
    system += f"; template arguments {d.chat_template_kwargs}" if d.chat_template_kwargs else ""
    system += "; tokenized as TRL does (data.trl_tokenization)" if d.trl_tokenization else ""
    sections = [f"tokenizer: {config.model.name_or_path}; rendered with {rendering}{system}"]
    for name, source, split in (("train", d.train, d.train_split), ("eval", d.eval, d.eval_split)):
        if source:
            pairs, _, stats = build_dataset(source, split, tokenizer, key=f"data.{name}", vision=processor,
                                          **settings(d, config.train.seed))
            sections.append(describe(name, source, stats, pairs, tokenizer, d))
    return "\n\n".join(sections)
