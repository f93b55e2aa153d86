"""Rows with images (TRL's vision preference shape): a conversational prompt with image placeholders
({"type": "image"} parts), chosen and rejected answers, and an `images` column (or `image`, one per
row) of images: their bytes as the hub's Parquet files store them, or paths (relative to the data
file's folder).

Each row's images are read and checked at tokenization (a missing file, unreadable bytes, or
placeholders that do not match the images are one line naming the row); the prompt is rendered with
the chat template and its image placeholders expanded into the image's tokens by the model's processor
(vision.Vision.prompt_ids). The tokenized pair keeps the images by reference ({bytes, path}) for
collation, where the processor turns them into pixel values batch by batch (vision.Vision.collate).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import datasets
from datasets import List, Value

from .rows import DataError, normalise
from .templates import render
from .tokenization import tokenize_templated, truncate

COLUMNS = ("images", "image")  # TRL's names: a list of images per row, or one image
STORED = List({"bytes": Value("binary"), "path": Value("string")})  # an image by reference, as datasets' Image() stores it
# the columns a tokenized pair with images carries beside its token ids
FEATURES = {"images": STORED, "image_digest": Value("string"), "image_sizes": List(List(Value("int32"))),
            "image_tokens": Value("int32")}
PLACEHOLDER = "<image>"  # an image part in the prompt as check-data and the evaluation examples show it


def column(rows: datasets.Dataset) -> str | None:
    """The source's image column, or None for a text-only source."""
    return next((name for name in COLUMNS if name in rows.column_names), None)


def by_reference(rows: datasets.Dataset, name: str) -> datasets.Dataset:
    """The image column as {bytes, path} references: datasets' Image() feature would decode every image
    while mapping, and the bytes are what the digest and the collation read."""
    feature = rows.features[name]
    inner = feature.feature if isinstance(feature, (List, datasets.Sequence)) else feature
    if isinstance(inner, datasets.Image):
        return rows.cast_column(name, List(datasets.Image(decode=False)) if inner is not feature
                                else datasets.Image(decode=False))
    return rows


def references(value, base: Path) -> list[dict]:
    """A row's image column value (one image or a list) -> [{bytes, path}], paths made absolute from `base`."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    found = []
    for index, image in enumerate(values):
        if isinstance(image, str):
            path = Path(image).expanduser()
            found.append({"bytes": None, "path": str(path if path.is_absolute() else base / path)})
        elif isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
            found.append({"bytes": image.get("bytes"), "path": image.get("path")})
        else:
            raise DataError(f"image {index} must be an image's bytes or a path, got {type(image).__name__} {image!r:.40}")
    return found


def read(reference: dict, index: int):
    """(the PIL image, its bytes) of a reference; DataError naming the image when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    data = reference["bytes"]
    if data is None:
        path = Path(reference["path"])
        if not path.is_file():
            raise DataError(f"image {index}: file not found: {path}")
        data = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes it whole: a truncated file fails here, not in a later batch
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        where = f" ({reference['path']})" if reference.get("path") else ""
        raise DataError(f"image {index}{where}: not a readable image ({str(e).splitlines()[0][:80]})") from None
    return image, data


def opened(references_: list[dict]) -> list:
    """The PIL images of a pair's references, for collation (they were read and checked at tokenization)."""
    return [read(reference, index)[0] for index, reference in enumerate(references_)]


def with_parts(pair: dict, count: int) -> dict:
    """The pair with every content as parts, as TRL's prepare_multimodal_messages makes them: a prompt
    without image parts gets its `count` images before the text of its first user turn. Raises DataError
    when the placeholders do not match the images, or an answer holds one."""
    parts = lambda content: content if isinstance(content, list) else [{"type": "text", "text": content}]
    placed = any(isinstance(turn["content"], list) for turn in pair["prompt"])
    prompt = []
    for turn in pair["prompt"]:
        content = parts(turn["content"])
        if not placed and turn["role"] == "user":
            content, placed = [{"type": "image", "text": None}] * count + content, True
        prompt.append({"role": turn["role"], "content": content})
    placeholders = sum(part["type"] == "image" for turn in prompt for part in turn["content"])
    if placeholders != count:
        raise DataError(f"field 'prompt' has {placeholders} image placeholders and the row {count} images; "
                        "give one {\"type\": \"image\"} part per image")
    for side in ("chosen", "rejected"):
        if any(isinstance(turn["content"], list) for turn in pair[side]):
            raise DataError(f"field {side!r} holds an image; images go in the prompt only")
    return {**pair, "prompt": prompt, **{side: [{"role": t["role"], "content": parts(t["content"])} for t in pair[side]]
                                         for side in ("chosen", "rejected")}}


def shown(turns: list[dict]) -> list[dict]:
    """Parts as text, each image as PLACEHOLDER: the prompt as check-data and the evaluation show it."""
    text = lambda content: content if isinstance(content, str) else "".join(
        PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)
    return [{"role": turn["role"], "content": text(turn["content"])} for turn in turns]


def encode(row: dict, name: str, base: Path, vision, tokenizer, max_length: int, max_prompt_length: int,
           template: str | None, system_prompt: str | None, template_kwargs: dict | None = None,
           trl_tokenization: bool = False) -> tuple[dict, dict]:
    """(the row in the internal form, its tokenized pair with FEATURES' columns) for a row whose image
    column is `name`: tokenization.encode's work, with each image's tokens in the prompt. A prompt whose
    truncation would cut into an image's tokens is dropped (its drop_reason says so)."""
    if vision is None:
        raise DataError(f"the data has images (column {name!r}), and the model has no image processor; "
                        "train a vision-language model on it")
    if template is None:
        raise DataError("a row with images needs a chat template to place them: the processor and tokenizer have "
                        "none, or data.chat_template is none")
    refs = references(row[name], base)
    images, digest = [], hashlib.sha256()
    for index, reference in enumerate(refs):
        image, data = read(reference, index)
        images.append(image)
        digest.update(hashlib.sha256(data).digest())
    pair = with_parts(normalise(row.get("prompt"), row["chosen"], row["rejected"]), len(images))
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    prompt_text, chosen_text, rejected_text, apart = render(pair, tokenizer, template, system_prompt, tools,
                                                            template_kwargs)
    if trl_tokenization:  # TRL's vision collator: each completion's text tokenized whole, what follows end-of-turn too
        completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (chosen_text, rejected_text)]
    else:
        completions = tokenize_templated(prompt_text, chosen_text, rejected_text, tokenizer)[1:]
    prompt_ids = vision.prompt_ids(prompt_text, images)
    ids = truncate(prompt_ids, *completions, tokenizer.eos_token_id, max_length, max_prompt_length)
    tokens = vision.image_tokens(prompt_ids)
    if ids["prompt_truncated"] and vision.image_tokens(ids["prompt_ids"]) < tokens and not ids["drop_reason"]:
        ids["drop_reason"] = "prompt truncated into its images (raise data.max_prompt_length)"
    shown_pair = {**pair, "prompt": shown(pair["prompt"])}
    columns = {"images": refs, "image_digest": digest.hexdigest(), "image_sizes": [list(i.size) for i in images],
               "image_tokens": tokens}
    return shown_pair, {**ids, "rendered_apart": apart, **columns}


def without_images(piece: datasets.Dataset) -> datasets.Dataset:
    """A text-only source's tokenized pairs with FEATURES' columns empty, to sit in a mixture with image sources."""
    empty = {"images": [], "image_digest": "", "image_sizes": [], "image_tokens": 0}
    for key, value in empty.items():
        piece = piece.add_column(key, [value] * len(piece), feature=FEATURES[key])
    return piece

