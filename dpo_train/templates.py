"""Chat templates: which one renders the data (`data.chat_template`), and rendering a row with it.

- `auto`: the tokenizer's own template; a tokenizer without one gets the text as it is.
- `none`: the text as it is, whatever the tokenizer has (TRL's convention for string data; see
  `data.tokenize_text`). Conversations then have no meaning and are refused.
- a shipped name (`chatml`) or a Jinja file: for a base model without a template. The run saves it
  with the tokenizer in final/, so the trained model is chatted with as it was trained.
"""

from __future__ import annotations

import os
from pathlib import Path

from .rows import DataError

# ChatML (<|im_start|>role\ncontent<|im_end|>\n), as SmolLM2, Qwen and others use it, without a default system turn.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SHIPPED = {"chatml": CHATML}  # keep in step with config.SHIPPED_TEMPLATES (a test checks)


def resolve(setting: str, tokenizer) -> str | None:
    """The Jinja template the data is rendered with, or None for text used as it is."""
    if setting == "none":
        return None
    if setting == "auto":
        return tokenizer.chat_template
    if setting in SHIPPED:
        return SHIPPED[setting]
    try:
        return Path(setting).read_text()
    except OSError as e:
        raise DataError(f"data.chat_template: cannot read {setting} ({e.strerror})") from None


def adopt(tokenizer, setting: str, processor=None) -> None:
    """Give the tokenizer the template `setting` names (a shipped one or a file), so that the
    tokenizer saved in final/ renders chats as the model was trained; auto and none change nothing.
    A vision-language model's processor (which saves its own template) gets the same one."""
    if setting not in ("auto", "none"):
        tokenizer.chat_template = resolve(setting, tokenizer)
    if processor is not None:
        processor.chat_template = tokenizer.chat_template


def describe(setting: str, template: str | None) -> str:
    """How the data is rendered, in words, for check-data and the log."""
    if template is None:
        why = "data.chat_template: none" if setting == "none" else "the tokenizer has no chat template"
        return f"no chat template ({why}): text as it is, EOS after each completion (TRL's convention)"
    if setting == "auto":
        return "the tokenizer's chat template"
    return f"the {setting} chat template" if setting in SHIPPED else f"the chat template in {os.path.basename(setting)}"


def with_system(prompt: list[dict], system_prompt: str | None) -> list[dict]:
    """The prompt's turns, opened by a system turn holding `system_prompt` unless they have one."""
    if not system_prompt or prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


ANSWER = "\x00the answer\x00"  # stands for an answer's content where the template places it (no tag, no blank)


def render(pair: dict, tokenizer, template: str, system_prompt: str | None = None, tools=None,
           template_kwargs: dict | None = None) -> tuple[str, str, str, bool]:
    """(prompt_text, chosen_text, rejected_text, apart) of a row in the internal form (rows.normalise):
    the prompt ends with the template's generation header, and each completion is what the
    template adds after it once the answer's turns follow. `tools` and `template_kwargs` (e.g.
    enable_thinking) reach the template as apply_chat_template passes them.

    Some templates render the prompt differently once an answer follows (thinking templates strip
    reasoning, or end the generation header with an empty thought block the full conversation
    lacks): then `apart` is True and the split follows the full rendering: the prompt is the text
    both full renderings share with the rendering of an answer-shaped placeholder, up to where that
    placeholder's content begins; each completion is the rest of its full rendering."""
    prompt = with_system(pair["prompt"], system_prompt)
    render_turns = lambda turns, **extra: apply(tokenizer, template, turns, tools=tools, **(template_kwargs or {}),
                                                **extra)
    prompt_text = render_turns(prompt, add_generation_prompt=True)
    full = [render_turns(prompt + pair[key]) for key in ("chosen", "rejected")]
    if all(text.startswith(prompt_text) for text in full):
        return prompt_text, full[0][len(prompt_text):], full[1][len(prompt_text):], False
    placeholder = render_turns(prompt + [{"role": pair["chosen"][0]["role"], "content": ANSWER}])
    shared = placeholder[:placeholder.find(ANSWER)] if ANSWER in placeholder else prompt_text
    shared = shared[:min(common_prefix_length(shared, text) for text in full)]
    return shared, full[0][len(shared):], full[1][len(shared):], True


def common_prefix_length(a, b) -> int:
    """How many leading items (characters, token ids) the sequences `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def apply(tokenizer, template: str, turns: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
          **kwargs):
    """The template's text for `turns` (token ids with `tokenize`, as apply_chat_template gives them); a
    template that refuses them (Jinja's raise_exception, as for a system turn a model does not support)
    is a DataError, one line, not a traceback. `kwargs` reach the template (tools, enable_thinking, ...)."""
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=tokenize,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        roles = ", ".join(t["role"] for t in turns)
        raise DataError(f"the chat template refuses these turns ({roles}): {str(e).splitlines()[0]}") from None
    return rendered["input_ids"] if tokenize and not isinstance(rendered, list) else rendered
