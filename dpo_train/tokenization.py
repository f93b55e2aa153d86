"""One preference row into token ids: the prompt (labelled -100 later) and two completions ending
with EOS, truncated to the configured lengths."""

from __future__ import annotations

import json

from .rows import FIELDS, DataError, normalise
from .templates import apply, common_prefix_length, render, with_system


def tokenize_pair(row: dict, tokenizer, max_length: int, max_prompt_length: int, template: str | None = "auto",
                  system_prompt: str | None = None) -> dict:
    """Tokenize one row (any shape rows.normalise takes) into prompt and completion ids.

    `template`: "auto" (the tokenizer's own chat template, if it has one), a Jinja template, or
    None (the text as it is; see tokenize_text). Truncation: the prompt is cut from the left to
    `max_prompt_length` (its end, next to the answer, matters most); then completions are cut from
    the right so prompt + completion fits `max_length`. A pair with an empty completion (nothing but
    EOS) or identical completions gets a `drop_reason`. `*_full_length` are the token counts before
    truncation.
    """
    return encode(row, tokenizer, max_length, max_prompt_length,
                  tokenizer.chat_template if template == "auto" else template, system_prompt)[1]


def encode(row: dict, tokenizer, max_length: int, max_prompt_length: int, template: str | None,
           system_prompt: str | None, template_kwargs: dict | None = None,
           trl_tokenization: bool = False) -> tuple[dict, dict]:
    """(the row in the internal form, its tokenized pair): tokenize_pair's work, `template` resolved. A
    row's `tools` (a list, or JSON text of one) and `template_kwargs` reach the template; with
    `trl_tokenization` a templated pair is tokenized as TRL 1.16 does it (tokenize_like_trl). The pair's
    `rendered_apart` says whether the template renders its prompt differently once an answer follows."""
    pair = normalise(row.get("prompt"), row["chosen"], row["rejected"])
    if imaged := next((k for k in FIELDS if any(isinstance(turn["content"], list) for turn in pair[k])), None):
        raise DataError(f"field {imaged!r} holds an image part, and the row has no images (an 'images' column)")
    tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
    apart = False
    if template is None:
        conversation = next((k for k in FIELDS if isinstance(row.get(k), list)), None)
        if conversation:
            raise DataError(f"field {conversation!r} is a conversation (a list of messages), which needs a chat "
                            "template: the tokenizer has none, or data.chat_template is none")
        ids = tokenize_text(*(pair[k][0]["content"] for k in FIELDS), tokenizer)
    elif trl_tokenization:
        ids = tokenize_like_trl(pair, tokenizer, template, system_prompt, tools, template_kwargs)
    else:
        *texts, apart = render(pair, tokenizer, template, system_prompt, tools, template_kwargs)
        ids = tokenize_templated(*texts, tokenizer)
    return pair, {**truncate(*ids, tokenizer.eos_token_id, max_length, max_prompt_length), "rendered_apart": apart}


def tokenize_text(prompt: str, chosen: str, rejected: str, tokenizer) -> tuple[list, list, list]:
    """Text as it is, exactly as TRL 1.16's DPOTrainer tokenizes string data (_prepare_dataset):
    each completion gets the EOS token's text unless it already ends with it; the prompt alone and
    prompt + completion are tokenized with the tokenizer's special tokens (so BOS where the
    tokenizer adds one); the completion starts where those token sequences part, which is before
    the prompt's end when its last token merges with the completion's first."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = [tokenizer(prompt + (text if text.endswith(eos) else text + eos))["input_ids"] for text in (chosen, rejected)]
    shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:shared], full[0][shared:], full[1][shared:]


def tokenize_like_trl(pair: dict, tokenizer, template: str, system_prompt: str | None, tools,
                      template_kwargs: dict | None) -> tuple[list, list, list]:
    """A templated pair as TRL 1.16's DPOTrainer tokenizes it (_prepare_dataset): the prompt with the
    generation header and each whole conversation tokenized by the template; each completion is what
    follows the token prefix the three share, so it also holds what the template writes after the
    end-of-turn token (ChatML's "\n" after <|im_end|>), which TRL scores."""
    prompt = with_system(pair["prompt"], system_prompt)
    ids = lambda turns, **extra: apply(tokenizer, template, turns, tokenize=True, tools=tools,
                                       **(template_kwargs or {}), **extra)
    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = [ids(prompt + pair[key]) for key in ("chosen", "rejected")]
    shared = min(common_prefix_length(prompt_ids, one) for one in full)
    return prompt_ids[:shared], full[0][shared:], full[1][shared:]


def tokenize_templated(prompt_text: str, chosen_text: str, rejected_text: str, tokenizer) -> tuple[list, list, list]:
    """Rendered text: the template already holds BOS and turn markers, so no special tokens are
    added; each completion ends at its last EOS (the template's end-of-turn, dropping the newline
    some templates add after it; TRL scores that newline too), or gets one appended."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completions = []
    for text in (chosen_text, rejected_text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos in ids:
            ids = ids[: len(ids) - ids[::-1].index(eos)]
        elif text:
            ids = ids + [eos]
        completions.append(ids)
    return prompt_ids, completions[0], completions[1]


def truncate(prompt_ids: list, chosen_ids: list, rejected_ids: list, eos: int, max_length: int,
             max_prompt_length: int) -> dict:
    full_lengths = {"prompt_full_length": len(prompt_ids), "chosen_full_length": len(chosen_ids),
                    "rejected_full_length": len(rejected_ids)}
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    completion_truncated = any(len(ids) > room for ids in (chosen_ids, rejected_ids))
    cut_chosen, cut_rejected = chosen_ids[:room], rejected_ids[:room]
    empty = any(not [i for i in ids if i != eos] for ids in (cut_chosen, cut_rejected))  # nothing but EOS
    drop_reason = ("empty completion" if empty else
                   "chosen == rejected" if chosen_ids == rejected_ids else
                   "chosen == rejected after truncation" if cut_chosen == cut_rejected else "")
    return {"prompt_ids": prompt_ids, "chosen_ids": cut_chosen, "rejected_ids": cut_rejected,
            "prompt_truncated": prompt_truncated, "completion_truncated": completion_truncated,
            "drop_reason": drop_reason, **full_lengths}
