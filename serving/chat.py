"""Chat templates: render OpenAI-style messages with the tokenizer's own Jinja template.

The template comes from `tokenizer_config.json` (`chat_template`, or `chat_template.jinja` beside
it), exactly as `transformers.apply_chat_template` would use it, rendered here with a sandboxed
Jinja environment so serving needs neither transformers nor trust in the template's author.

Also finds the tokens that END an assistant turn (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`):
a chat reply must stop there even when the model's eos token is a different one.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lmforge.errors import UserError
from lmforge.serving.protocol import APIError, bad_request

_SENTINEL = "\u2063lmforge-probe\u2063"  # an invisible separator no template produces on its own


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise UserError(f"the tokenizer's chat_template is not valid Jinja: {err}") from err
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template that rejects them (e.g. roles that must
        alternate) is the client's error: 400 with the template's own message."""
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except _TemplateRejected as err:
            raise bad_request(f"messages: {err}", "messages") from err
        except jinja2.TemplateError as err:
            raise APIError(
                400, f"messages: the model's chat template cannot render them: {err}", param="messages"
            ) from err

    def turn_end_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Special tokens the template writes right after a message's content (turn terminators)."""
        try:
            text = self.template.render(
                messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}],
                add_generation_prompt=False,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except jinja2.TemplateError:
            return []
        _, found, after = text.partition(_SENTINEL)
        if not found or not after:
            return []
        special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        for content, token_id in special.items():
            if after.lstrip(" ").startswith(content):
                return [token_id]
        return []


class _TemplateRejected(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRejected(message)
