"""Vision-language models: the checkpoint's processor, and pixel values through the forward.

A pair's images are read from their references (images.py) at collation, batch by batch, and given to
the model as the processor makes them (`pixel_values`, and whatever else its image processor returns),
in the order the model fills its image tokens: row by row. In the `packed` and `rows` layouts each
pair's prompt, and so each of its images, is in the batch once: the vision tower encodes each image once
per pair, as the language model does the prompt's tokens. In `padded` (and in TRL) a pair's images go
through it twice, once with each answer.

Some processors mark the image tokens (token_type_ids: Gemma 3's image tokens attend to each other both
ways, mm_token_type_ids: Qwen-VL's positions). The marks are made from the batch's token ids here, in every
layout. The pair attention of `packed` is causal only, so such a model is not scored packed with images;
in `rows` each image's tokens see each other in the rows' mask, as the model's own mask makes them.
"""

from __future__ import annotations

import functools

import torch
from transformers import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig, AutoProcessor

from .collate import COLLATES
from .images import opened
from .models import TOKENIZER_KWARGS, ModelError, hf_dir

IMAGE_INPUTS = "image_inputs"  # a batch's key for its images' model inputs (logps passes them to the forward)
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # made from token ids, per layout
TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def is_vision_language(name_or_path: str, init_kwargs: dict | None = None) -> bool:
    """Whether the checkpoint is a vision-language model (its config is one AutoModelForImageTextToText loads)."""
    try:
        config = AutoConfig.from_pretrained(hf_dir(name_or_path), **{k: v for k, v in (init_kwargs or {}).items()
                                                                     if k in TOKENIZER_KWARGS})
    except (OSError, ValueError):  # a LoRA adapter directory, or no model at all: models.py says which
        return False
    return type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING


def load(name_or_path: str, tokenizer, init_kwargs: dict | None = None) -> Vision | None:
    """The checkpoint's processor as a Vision, using `tokenizer` (its pad token); None for a model without an
    image processor. The tokenizer gets the processor's chat template (it renders images), when there is one."""
    if not is_vision_language(name_or_path, init_kwargs):
        return None
    try:
        processor = AutoProcessor.from_pretrained(hf_dir(name_or_path), **{k: v for k, v in (init_kwargs or {}).items()
                                                                           if k in TOKENIZER_KWARGS})
    except (OSError, ValueError, TypeError, ImportError) as e:  # torchvision missing for Qwen-VL's video processor
        raise ModelError(f"{name_or_path}: cannot load its processor ({str(e).splitlines()[0][:160]})") from None
    if getattr(processor, "image_processor", None) is None:
        return None
    tokenizer.chat_template = getattr(processor, "chat_template", None) or tokenizer.chat_template  # the multimodal one
    processor.tokenizer = tokenizer
    return Vision(processor)


class Vision:
    """A processor as the run uses it: the prompt's ids with each image's tokens in place, and the model's
    image inputs for a batch of rows. A probe image through the processor says which token ids are image
    tokens and which inputs the model takes."""

    def __init__(self, processor):
        from PIL import Image

        self.processor = processor
        probe = ([processor.image_token], [[Image.new("RGB", (32, 32))]])
        given = processor(text=probe[0], images=probe[1])
        typed = processor(text=probe[0], images=probe[1], return_mm_token_type_ids=True)
        types = next(typed[key][0] for key in TYPE_KEYS if key in typed)
        self.image_ids = torch.tensor(sorted({i for i, kind in zip(typed["input_ids"][0], types) if kind}))
        self.type_key = next((key for key in TYPE_KEYS if key in given), None)  # marks the model reads, if any
        self.image_keys = [key for key in given if key not in TEXT_KEYS]
        # the pair attention does not implement what the marks change (a bidirectional block, positions); the
        # positions a model makes from mm_token_type_ids (Qwen-VL's M-RoPE, from the image grid) are 3-axis, and
        # the rows layout's position ids (one axis, the rejected answer restarting at the prompt's end) are not
        self.not_exact = {"packed": f"its processor marks image tokens ({self.type_key}) for the model's own masks "
                                    "or positions, which the pair attention does not implement"} if self.type_key else {}
        if self.type_key == "mm_token_type_ids":
            self.not_exact["rows"] = ("the model makes its positions (3 axes, M-RoPE) from the image grid, and the rows "
                                      "layout gives it one-axis position ids")

    def prompt_ids(self, text: str, images: list) -> list[int]:
        """A rendered prompt's token ids, each image placeholder expanded into its image's tokens."""
        inputs = self.processor(text=[text], images=[images] if images else None, add_special_tokens=False)
        return list(inputs["input_ids"][0])

    def image_tokens(self, ids: list[int]) -> int:
        """How many of `ids` are image tokens (those the vision tower's features replace)."""
        return int(torch.isin(torch.tensor(ids, dtype=torch.long), self.image_ids).sum())

    def marks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) bool: the image tokens among `input_ids` (N, T)."""
        return torch.isin(input_ids, self.image_ids.to(input_ids.device))

    def inputs(self, images: list, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image inputs for rows `input_ids` (N, T) whose image tokens, row by row, are those of
        `images` in order: the processor's pixel values (and its other image inputs), and its marks."""
        placeholders = [self.processor.image_token * len(images)]
        made = self.processor(text=placeholders, images=[images], return_tensors="pt")
        found = {key: made[key] for key in self.image_keys}
        if self.type_key:
            found[self.type_key] = self.marks(input_ids).long()
        return found

    def collate(self, layout: str, pairs: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """COLLATES[layout]'s batch, with the pairs' images as IMAGE_INPUTS: each pair's once in `packed` and
        `rows` (one span or row per pair), twice in `padded` (chosen rows, then rejected rows)."""
        batch = COLLATES[layout](pairs, pad_token_id)
        pictures = [image for pair in pairs for image in opened(pair["images"])]
        if pictures:
            batch[IMAGE_INPUTS] = self.inputs(pictures * (2 if layout == "padded" else 1), batch["input_ids"])
            if layout == "rows" and self.type_key:
                both_ways(batch["attention_mask"], self.marks(batch["input_ids"]))
        return batch

    def collates(self) -> Collates:
        """{layout: collate function} as collate.COLLATES, with images; `not_exact` says which layout is not exact."""
        return Collates({layout: functools.partial(self.collate, layout) for layout in COLLATES}, self.not_exact)

    def generation_inputs(self, images: list[list], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image inputs of left-padded prompts `input_ids` (N, T) with their `images` (a list per prompt)."""
        pictures = [image for references in images for image in opened(references)]
        return self.inputs(pictures, input_ids) if pictures else {}


class Collates(dict):
    """{layout: collate function}, and `not_exact`: {layout: why it is not exact for these inputs}."""

    def __init__(self, functions: dict, not_exact: dict[str, str]):
        super().__init__(functions)
        self.not_exact = not_exact


def both_ways(mask: torch.Tensor, image: torch.Tensor) -> None:
    """Let each image's tokens attend to each other in a rows mask (B, 1, T, T) bool, in place: the block of
    consecutive image tokens (B, T) a token is in, as Gemma 3's mask makes them (its blockwise overlay)."""
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    block = torch.where(image, starts.cumsum(dim=1), 0)  # (B, T): 1, 2, ... per image, 0 elsewhere
    mask |= ((block[:, :, None] == block[:, None, :]) & image[:, :, None])[:, None]

