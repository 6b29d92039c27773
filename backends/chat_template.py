"""Chat templates, shared by every backend.

A model's own template (Jinja, from ``tokenizer.chat_template`` in a GGUF
file or from ``tokenizer_config.json`` / ``chat_template.jinja`` in a model
folder) is rendered in a sandbox with the helpers Hugging Face templates
expect (``raise_exception``, ``tojson``, ``strftime_now``). When the model
has none we fall back to ChatML for generic models, to Gemma 4's
``<|turn>``/``<turn|>`` format for gemma4 architectures and to Gemma's
``<start_of_turn>``/``<end_of_turn>`` format for the other gemma ones
(:func:`fallback_template`); a template from the config overrides them.

:func:`choose_template` makes that choice (config > model > fallback) and
:func:`render` renders, so every backend picks and renders templates the
same way.

A template is data from the model file, so it is rendered within bounds on
time, output and value sizes (``backends/template_bounds.py``): one over
them raises :class:`TemplateBoundError`. :func:`check_template` test-renders
a template on small conversations at load (``choose_template`` does it for
the config's and the model's own), so a template that cannot stay within
them is refused at load, naming the model.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .base import BackendError, ModelLoadError


class ChatTemplateError(BackendError):
    """A chat template failed on a conversation: it rejected it, or broke down rendering it."""


class TemplateBoundError(ChatTemplateError):
    """A chat template went over a bound on render time, output or value size."""


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

# Gemma 4's turn format (google-gemma-4-31B-it.jinja, vendored in llama.cpp's
# models/templates; its tools, media and thinking left out): a leading system
# (or developer) message is a turn of its own, the assistant's role is "model",
# turns are <|turn>ROLE ... <turn|>. With thinking off, as here, the real
# template opens the reply with an empty thought channel.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% set loop_messages = messages %}"
    "{% if messages and messages[0]['role'] in ['system', 'developer'] %}"
    "{{ '<|turn>system\n' + messages[0]['content'] | trim + '<turn|>\n' }}"
    "{% set loop_messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n<|channel>thought\n<channel|>' }}{% endif %}"
)


def fallback_template(arch: str) -> tuple[str, str]:
    """(template, what it is) for a model of architecture ``arch`` without one of
    its own: Gemma 4's turns, Gemma's (1-3), else ChatML."""
    if arch.startswith("gemma4"):
        return GEMMA4_TEMPLATE, "Gemma 4 turns"
    if arch.startswith("gemma"):
        return GEMMA_TEMPLATE, "Gemma turns"
    return CHATML_TEMPLATE, "ChatML"


def compile_template(source: str):
    """Compile a Jinja chat template in the bounded sandbox; raises ``jinja2.TemplateError``
    (or :class:`TemplateBoundError` for a source over the size bound)."""
    import jinja2

    from . import template_bounds

    limit = template_bounds.DEFAULT_LIMITS.max_source_chars
    if len(source) > limit:
        raise TemplateBoundError(f"the chat template is {len(source):,} characters long (the bound is {limit:,})")

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 16:  # an indent is per nesting level: keep it a real one
            raise TemplateBoundError(f"the chat template asked tojson for an indent of {indent:,}")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        # Each directive writes at most a few dozen characters (%c); the format itself is a checked value.
        template_bounds.current().check_size(len(fmt) + 64 * str(fmt).count("%"), "a date")
        return datetime.now().strftime(fmt)

    env = template_bounds.environment(
        filters={"tojson": tojson},
        globals={"raise_exception": raise_exception, "strftime_now": strftime_now},
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        return env.from_string(source)
    except jinja2.TemplateError:
        raise
    except (RecursionError, ValueError, OverflowError, MemoryError) as exc:
        # Too deeply nested to parse, an integer literal too long...: it does not compile.
        raise jinja2.TemplateSyntaxError(f"{type(exc).__name__}: {exc}", 1) from None


def choose_template(own: str | None, arch: str, override: str | None,
                    choices: dict[str, str], *, model: str = "") -> tuple[str, Any, str]:
    """(template source, compiled template, source kind) for a model.

    ``own`` is the model's template (None when it has none), ``override`` the
    config's. The kind is "config", "model" or "fallback"; ``choices`` gets a
    ``chat_template`` entry saying why. A config template that does not
    compile is a ``ModelLoadError``; the model's own falls back instead.
    Either one that goes over the render bounds on a test conversation
    (:func:`check_template`) is a ``ModelLoadError`` naming ``model``.
    """
    from jinja2 import TemplateError

    if override:
        try:
            compiled = compile_template(override)
        except TemplateError as exc:
            raise ModelLoadError(f"the chat template set in the config does not compile: {exc}") from exc
        except TemplateBoundError as exc:
            raise ModelLoadError(f"{_named(model)}: {exc} (the template set in the config)") from None
        check_template(compiled, model=model, origin="set in the config")
        choices["chat_template"] = "set in the config"
        return override, compiled, "config"
    if own:
        try:
            compiled = compile_template(own)
        except TemplateError as exc:
            choices["chat_template"] = f"the model's own template does not compile ({exc}); using a fallback"
        except TemplateBoundError as exc:
            raise ModelLoadError(f"{_named(model)}: {exc} (the model's own template); refusing it") from None
        else:
            check_template(compiled, model=model, origin="the model's own")
            choices["chat_template"] = "the model's own"
            return own, compiled, "model"
    fallback, kind = fallback_template(arch)
    choices.setdefault("chat_template", f"the model has none; fallback {kind}")
    return fallback, compile_template(fallback), "fallback"


def _named(model: str) -> str:
    return f"model {model!r}" if model else "the model"


# Small conversations a template is tried on at load: plain, with a system
# turn and history, and with a tool (templates branch on each).
_PROBES: tuple[tuple[list[dict[str, Any]], dict[str, Any]], ...] = (
    ([{"role": "user", "content": "Hello"}], {}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Thanks"}], {}),
    ([{"role": "user", "content": "What time is it?"}],
     {"tools": [{"type": "function", "function": {"name": "clock", "description": "The time",
                                                  "parameters": {"type": "object", "properties": {}}}}]}),
)


def check_template(template: Any, *, model: str = "", origin: str = "", bos_token: str = "<s>",
                   eos_token: str = "</s>", limits: Any = None) -> None:
    """Test-render ``template`` on small conversations under the render bounds.

    Raises ``ModelLoadError`` naming ``model`` if any render goes over a bound
    (a template that cannot render a greeting within them never will). A
    template that rejects a test conversation (``raise_exception``, say
    because it has no system role) is left alone: that is its right.
    """
    for messages, extra in _PROBES:
        try:
            render(template, messages, bos_token=bos_token, eos_token=eos_token, model=model, limits=limits,
                   **extra)
        except TemplateBoundError as exc:
            where = f" ({origin} template)" if origin else ""
            raise ModelLoadError(f"{exc}{where}; refusing to load it") from None
        except ChatTemplateError:
            continue


def render(template: Any, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str,
           add_generation_prompt: bool = True, model: str = "", limits: Any = None, **kwargs: Any) -> str:
    """Render a compiled template within the bounds (``limits``: a ``template_bounds.TemplateLimits``).

    Raises :class:`TemplateBoundError` over a bound and :class:`ChatTemplateError`
    when the template rejects the conversation or fails on it; both are a
    ``BackendError`` whose message names ``model`` when given.
    """
    from jinja2 import TemplateError

    from . import template_bounds

    variables = dict(messages=messages, bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt, **kwargs)
    prefix = f"{_named(model)}: " if model else ""
    try:
        return template_bounds.render(template, variables, limits or template_bounds.DEFAULT_LIMITS)
    except TemplateBoundError as exc:
        raise TemplateBoundError(f"{prefix}{exc}") from None
    except TemplateError as exc:
        raise ChatTemplateError(f"{prefix}the chat template rejected the conversation: {exc}") from exc
    except BackendError:
        raise
    except RecursionError:  # a macro calling itself without end: the depth bound is Python's
        raise TemplateBoundError(f"{prefix}the chat template nests its calls too deeply") from None
    except Exception as exc:  # noqa: BLE001 - the template is the model file's code: its failure is the model's
        raise ChatTemplateError(f"{prefix}the chat template failed on this conversation: "
                                f"{type(exc).__name__}: {exc}") from exc
