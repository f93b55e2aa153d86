"""Tiny vision-language models built locally (no downloads), each with its processor: a LLaVA (CLIP vision
tower, a Llama text model; CLIP's PIL image processor) and a Gemma 3 (SigLIP tower, Gemma 3 text model with
sliding and full layers; its image tokens attend to each other both ways). initializer_range 0.2 in both
towers, so that a leak between spans or images shows. And, where torchvision is installed (it cannot be
beside this machine's CPU torch, so not in CI), a Qwen2-VL, whose processor needs it (WITH_TORCHVISION).

A family is added here, as one entry of VLMS, never as a branch in dpo_train.
"""

from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

import numpy as np
import torch
import transformers as T
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from conftest import SPECIALS
from families import make_config

IMAGE_SIZE = 28  # pixels; 14-pixel patches: 4 image tokens per image
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
              patch_size=14, initializer_range=0.2)


def template(image: str) -> str:
    """ChatML over content parts: text as it is, each image part as `image` (what the processor expands)."""
    return ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['content'] is string %}"
            "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '" + image + "' }}"
            "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenizer(extra: list[str], named: dict[str, str] | None = None) -> T.PreTrainedTokenizerFast:
    """tests/conftest.py's one-token-per-character ChatML tokenizer with the image tokens `extra` (special)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + extra + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS + extra)
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                     eos_token="<|im_end|>", extra_special_tokens=named or {})


def llava(seed: int = 0):
    """(model, processor): LlavaForConditionalGeneration, CLIP tower (CLS dropped: 'default'), Llama text model."""
    tok = tokenizer(["<image>"])
    processor = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                 tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template("<image>"))
    config = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**VISION), text_config=make_config("llama", len(tok)).to_dict(),
                           image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                           vision_feature_layer=-1, projector_hidden_act="gelu", initializer_range=0.2)
    return build(config, seed), processor


def gemma3(seed: int = 0):
    """(model, processor): Gemma3ForConditionalGeneration, SigLIP tower, 4 tokens per image (token_type_ids mark them)."""
    names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tok = tokenizer(list(names.values()), names)
    processor = T.Gemma3Processor(image_processor=T.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                  tokenizer=tok, chat_template=template("<start_of_image>"), image_seq_length=4)
    config = T.Gemma3Config(text_config=make_config("gemma3_text", len(tok)).to_dict(), vision_config=VISION,
                            mm_tokens_per_image=4, image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                            eoi_token_index=tok.eoi_token_id, initializer_range=0.2)
    return build(config, seed), processor


def qwen2vl(seed: int = 0):
    """(model, processor): Qwen2VLForConditionalGeneration, its patch-merging tower, M-RoPE positions (3 axes, made
    by the model from the image grid: mm_token_type_ids mark the image tokens), 4 tokens per image. Its processor
    needs torchvision (its video processor), so only where torchvision is installed."""
    image_tokens = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tok = tokenizer(image_tokens, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                   "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}  # every image resized to 56 x 56: 4 merged patches
    processor = T.Qwen2VLProcessor(image_processor=T.Qwen2VLImageProcessor(size=size),
                                   video_processor=T.Qwen2VLVideoProcessor(size=size), tokenizer=tok,
                                   chat_template=template("<|vision_start|><|image_pad|><|vision_end|>"))
    text = make_config("qwen2", len(tok)).to_dict()
    text.update(model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 3, 3]})  # head_dim 16: 8 pairs
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           [("vision_start_token_id", "<|vision_start|>"), ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>")]}
    config = T.Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"],
                                                                  num_heads=2, mlp_ratio=2, initializer_range=0.2),
                             initializer_range=0.2, **ids)
    return build(config, seed), processor


def build(config, seed: int) -> torch.nn.Module:
    from dpo_train.models import disable_dropout
    torch.manual_seed(seed)
    model = T.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    disable_dropout(model)
    return model


VLMS = {"llava": llava, "gemma3": gemma3}  # family -> builder; docs/vision.md's table follows it
WITH_TORCHVISION = {"qwen2vl": qwen2vl}  # built only where torchvision is installed (not beside the CPU torch here)
TORCHVISION = importlib.util.find_spec("torchvision") is not None
USED = {"llava": "packed", "gemma3": "rows", "qwen2vl": "padded"}  # the layout a run asking for packed gets with images
INEXACT = {"qwen2vl": ("packed", "rows")}  # the layouts that score a family's image pairs wrong (so never used)


def save(family: str, path: Path) -> Path:
    """The family's tiny model and processor saved as a checkpoint (from_pretrained loads both)."""
    model, processor = VLMS[family]()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def image(seed: int, size: tuple[int, int] = (40, 30)):
    """A random RGB picture (W x H), different for each seed."""
    from PIL import Image
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_rows(n: int, folder: Path, seed: int = 0) -> list[dict]:
    """n pairs in TRL's vision shape with their pictures saved as PNG files in `folder` (paths relative to it):
    one or two images each, as placeholders in the prompt's parts, or (every third row) a prompt given as text,
    its image placed before it as TRL does."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        count = 1 + (i % 4 == 1)
        paths = []
        for j in range(count):
            name = f"image-{seed}-{i}-{j}.png"
            image(1000 * seed + 10 * i + j, (rng.randint(20, 60), rng.randint(20, 60))).save(folder / name)
            paths.append(name)
        question = rng.choice(["What is shown?", "Describe it.", "Which colour is it?", "How many?"])
        prompt = ([{"role": "user", "content": question}] if i % 3 == 2 else
                  [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": question}]}])
        answer = rng.choice(["red", "blue", "two", "a cat", "nothing"])
        rows.append({"images": paths, "prompt": prompt, "chosen": [{"role": "assistant", "content": f"It is {answer}."}],
                     "rejected": [{"role": "assistant", "content": f"Perhaps {answer[::-1]}, or not at all."}],
                     "answer": f"It is {answer}."})
    return rows


def naive_logps(model, processor, rows: list[dict], pairs: list[dict], folder: Path) -> torch.Tensor:
    """(2B,) chosen then rejected: each sequence alone, as the model runs the processor's own outputs for its
    whole text and images (token_type_ids too), log_softmax + gather over the completion's tokens."""
    from PIL import Image

    from dpo_train.images import with_parts
    from dpo_train.rows import normalise
    from dpo_train.templates import render
    sums = []
    for side in ("chosen", "rejected"):
        for row, pair in zip(rows, pairs):
            pictures = [Image.open(folder / path) for path in row["images"]]
            turns = with_parts(normalise(row["prompt"], row["chosen"], row["rejected"]), len(pictures))
            prompt_text, chosen_text, rejected_text, _ = render(turns, processor.tokenizer, processor.chat_template)
            text = prompt_text + (chosen_text if side == "chosen" else rejected_text)
            inputs = processor(text=[text], images=[pictures], add_special_tokens=False, return_tensors="pt")
            ids = pair["prompt_ids"] + pair[f"{side}_ids"]
            assert inputs["input_ids"][0, :len(ids)].tolist() == ids  # the processor's own tokens, end-of-turn newline aside
            inputs = {k: v[:, :len(ids)] if k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids") else v
                      for k, v in inputs.items()}
            logps = torch.log_softmax(model(**inputs).logits[0, :-1].float(), -1)
            first = len(pair["prompt_ids"]) - 1
            targets = torch.tensor(ids[1:])
            sums.append(logps[first:].gather(-1, targets[first:, None]).sum())
    return torch.stack(sums)
