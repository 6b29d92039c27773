"""Chat templates, shared by every backend.

A model's own template (Jinja, from ``tokenizer.chat_template`` in a GGUF
file or from ``tokenizer_config.json`` / ``chat_template.jinja`` in a model
folder) is rendered in a sandbox with the helpers Hugging Face templates
expect (``raise_exception``, ``tojson``, ``strftime_now``). When the model
has none we fall back to ChatML for generic models and to Gemma's
``<start_of_turn>``/``<end_of_turn>`` format for gemma architectures; a
template from the config overrides both.

:func:`choose_template` makes that choice (config > model > fallback) and
:func:`render` renders, so every backend picks and renders templates the
same way.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .base import BackendError, ModelLoadError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format: roles "user" and "model"; a system message is folded
# into the first user turn (Gemma has no system role).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def compile_template(source: str):
    """Compile a Jinja chat template in a sandbox; raises ``jinja2.TemplateError``."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def choose_template(own: str | None, arch: str, override: str | None,
                    choices: dict[str, str]) -> tuple[str, Any, str]:
    """(template source, compiled template, source kind) for a model.

    ``own`` is the model's template (None when it has none), ``override`` the
    config's. The kind is "config", "model" or "fallback"; ``choices`` gets a
    ``chat_template`` entry saying why. A config template that does not
    compile is a ``ModelLoadError``; the model's own falls back instead.
    """
    from jinja2 import TemplateError

    if override:
        try:
            compiled = compile_template(override)
        except TemplateError as exc:
            raise ModelLoadError(f"the chat template set in the config does not compile: {exc}") from exc
        choices["chat_template"] = "set in the config"
        return override, compiled, "config"
    if own:
        try:
            compiled = compile_template(own)
            choices["chat_template"] = "the model's own"
            return own, compiled, "model"
        except TemplateError as exc:
            choices["chat_template"] = f"the model's own template does not compile ({exc}); using a fallback"
    fallback = GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE
    kind = "Gemma turns" if fallback is GEMMA_TEMPLATE else "ChatML"
    choices.setdefault("chat_template", f"the model has none; fallback {kind}")
    return fallback, compile_template(fallback), "fallback"


def render(template: Any, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a compiled template; a template that rejects the conversation raises ``BackendError``."""
    from jinja2 import TemplateError

    try:
        return template.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as exc:
        raise BackendError(f"the chat template rejected the conversation: {exc}") from exc
