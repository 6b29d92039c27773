"""Chat templates are model-file code: rendering one is bounded in time, output and
value sizes (backends/template_bounds.py), and a template over the bounds is
refused at load, naming the model (issue 14, defect 13)."""

from __future__ import annotations

import json

import pytest

from backends import chat_template as ct
from backends.base import BackendError, ModelLoadError
from backends.template_bounds import TemplateLimits

# Short bounds keep the time-bound cases quick; the size bounds are the defaults.
FAST = TemplateLimits(seconds=0.5)

HELLO = [{"role": "user", "content": "Hello"}]

BOMBS = {
    # the cases
    "repeat": "{{ 'a' * 10**8 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "range over 100,000": "{% for i in range(100001) %}{% endfor %}",
    # more ways to spend time
    "nested loops over a list": ("{% set l = range(100000)|list %}"
                                 "{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}"),
    "branching recursion": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(60) }}"),
    "endless recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "big block": "{% set x %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}{{ x }}",
    # more ways to make a big value in one step
    "power": "{{ 7 ** (10**7) }}",
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}"
                 "{{ ns.n }}"),
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "doubling concat": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}"),
    "doubling sum": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}{{ ns.s|length }}"),
    "self-referencing list": ("{% set ns = namespace(l=['x' * 1000]) %}{% for i in range(60) %}"
                              "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}"),
    "list of big strings": "{{ ['x' * 1000000] * 1000000 }}",
    "center filter": "{{ 'a'|center(10**9) }}",
    "ljust method": "{{ 'a'.ljust(10**9) }}",
    "replace method": "{{ ('a' * 1000).replace('a', 'b' * 100000) }}",
    "replace filter": "{{ ('a' * 1000)|replace('a', 'b' * 100000) }}",
    "percent width": "{{ '%099999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "format nested width": "{{ '{:>{}}'.format(1, 10**9) }}",
    "join method": "{{ ('x' * 100000).join(range(1000)|map('string')) }}",
    "join filter": "{{ range(1000)|join('x' * 100000) }}",
    "sum of lists": "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}",
    "indent": "{{ ('a\n' * 100000)|indent(100000) }}",
    "wordwrap": "{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 1000) }}",
    "strftime": "{{ strftime_now('%c' * 100000) }}",
    "tojson indent": "{{ messages|tojson(indent=1000000) }}",
    "batch fill": "{{ [1]|batch(10**9, 'x')|list }}",
}


@pytest.mark.parametrize("source", BOMBS.values(), ids=BOMBS.keys())
def test_a_template_over_a_bound_raises_a_clear_backend_error(source):
    template = ct.compile_template(source)
    with pytest.raises(ct.TemplateBoundError) as info:
        ct.render(template, HELLO, bos_token="<s>", eos_token="</s>", model="evil", limits=FAST)
    assert isinstance(info.value, BackendError)
    assert info.value.args[0].startswith("model 'evil': the chat template ")


def test_helpers_that_grow_text_by_their_arguments_are_gone():
    import jinja2

    with pytest.raises(ct.ChatTemplateError, match="'lipsum' is undefined"):
        ct.render(ct.compile_template("{{ lipsum(10**6) }}"), HELLO, bos_token="", eos_token="")
    with pytest.raises(jinja2.TemplateError, match="urlize"):  # an unknown filter: it does not compile
        ct.compile_template("{{ 'see http://x.org'|urlize }}")


def test_a_template_error_is_a_chat_template_error_naming_the_model():
    template = ct.compile_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ct.ChatTemplateError, match="model 'm': .*rejected the conversation: roles must alternate"):
        ct.render(template, HELLO, bos_token="", eos_token="", model="m")
    broken = ct.compile_template("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ct.ChatTemplateError, match="failed on this conversation: TypeError"):
        ct.render(broken, HELLO, bos_token="", eos_token="")


def test_a_source_too_long_or_too_deep_does_not_compile_or_is_refused():
    with pytest.raises(ct.TemplateBoundError, match="characters long"):
        ct.compile_template("x" * (1 << 20))
    choices: dict[str, str] = {}
    source, _, kind = ct.choose_template("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "llama", None, choices)
    assert kind == "fallback" and "does not compile" in choices["chat_template"]


# -- refused at load ---------------------------------------------------------------------------


def test_check_template_refuses_a_template_over_the_bounds_naming_the_model():
    template = ct.compile_template(BOMBS["nested loops"])
    with pytest.raises(ModelLoadError, match="model 'evil-7b': the chat template ran longer than 0.5 s"):
        ct.check_template(template, model="evil-7b", limits=FAST)


def test_check_template_lets_a_template_reject_the_test_conversations():
    ct.check_template(ct.compile_template("{{ raise_exception('no system role') }}"), model="m")
    ct.check_template(ct.compile_template(ct.GEMMA_TEMPLATE), model="gemma")


def test_choose_template_refuses_the_models_own_or_the_configs_template_over_the_bounds():
    own = "{% if tools %}{{ 'a' * 10**9 }}{% endif %}{{ messages[0]['content'] }}"  # only with tools
    with pytest.raises(ModelLoadError, match="model 'evil': .*model's own"):
        ct.choose_template(own, "llama", None, {}, model="evil")
    with pytest.raises(ModelLoadError, match="model 'evil': .*set in the config"):
        ct.choose_template("ChatML", "llama", BOMBS["repeat"], {}, model="evil")
    with pytest.raises(ModelLoadError, match="model 'evil': the chat template is .* characters long"):
        ct.choose_template("x" * (1 << 20), "llama", None, {}, model="evil")
    source, _, kind = ct.choose_template(ct.CHATML_TEMPLATE, "llama", None, {}, model="fine")
    assert kind == "model"


# -- normal templates render as before -------------------------------------------------------

# A template in the style of real ones (Llama 3.1's tool template, trimmed):
# namespace, loop.last, for-else, filters, macros, set blocks, ~, tojson, strftime.
REALISTIC = """\
{%- macro render_content(c) -%}{%- if c is string -%}{{ c | trim }}{%- else -%}\
{%- for part in c if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}
{{- bos_token }}
{%- set ns = namespace(system='', n=0) %}
{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] | trim %}{%- endif %}
{%- set date %}{{ strftime_now('%Y') }}{% endset %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}Tools:\\n{% for t in tools %}{{ t | tojson(indent=4) }}{{ '\\n\\n' if not loop.last }}{% endfor %}\
{%- else %}No tools.{% endif %}
{{- '\\nCutting Knowledge Date: December 2023 (' ~ (date | length) ~ ')\\n' }}
{{- ns.system ~ '<|eot_id|>' }}
{%- for message in messages if message['role'] != 'system' %}
{%- set ns.n = ns.n + 1 %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}{{ render_content(message['content']) }}
{%- if message.get('tool_calls') %}{% for call in message['tool_calls'] %}{{ call | tojson }}{% endfor %}{% endif %}
{{- '<|eot_id|>' }}{{ '\\n' if loop.index is divisibleby 10 else '' }}
{%- else %}(empty){% endfor %}
{%- for k, v in {'b': 2, 'a': 1} | dictsort %}{{ k }}={{ '%d' % v }}{{ ',' if not loop.last }}{% endfor %}
{{- '(%d turns, %s)' | format(ns.n, messages | length) }}{{ ' '.join(['a', 'b']) }}{{ '{}!'.format('x') }}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}
"""

TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                          "required": ["q"]}}}]


def conversation(n: int, size: int = 300, *, parts: bool = True) -> list[dict]:
    """A system turn, then ``n`` turns; with ``parts`` some user turns are lists of content parts."""
    msgs = [{"role": "system", "content": "  You are helpful.  "}]
    for i in range(n):
        content = f"turn {i}: " + "words and more words " * (size // 20)
        if i % 2:
            msgs.append({"role": "assistant", "content": content,
                         **({"tool_calls": [{"name": "search", "arguments": {"q": str(i)}}]} if i % 10 == 1 else {})})
        else:
            msgs.append({"role": "user", "content": content if i % 4 or not parts else [{"type": "text", "text": content}]})
    return msgs


def plain_render(source: str, messages: list[dict], **variables) -> str:
    """The same template under Jinja's sandbox without the bounds (as before)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["strftime_now"] = ct.compile_template("").environment.globals["strftime_now"]
    return env.from_string(source).render(messages=messages, bos_token="<s>", eos_token="</s>",
                                          add_generation_prompt=True, **variables)


@pytest.mark.parametrize("source", [REALISTIC, ct.CHATML_TEMPLATE], ids=["realistic", "chatml"])
def test_normal_templates_render_as_without_the_bounds(source):
    msgs = conversation(50, parts=source is REALISTIC)
    for variables in ({}, {"tools": TOOLS}):
        expected = plain_render(source, msgs, **variables)
        got = ct.render(ct.compile_template(source), msgs, bos_token="<s>", eos_token="</s>", **variables)
        assert got == expected
    if source is REALISTIC:
        assert "(50 turns, 51)" in got and "a=1,b=2" in got and "Tools:" in got


def test_gemma_fallback_renders_as_without_the_bounds():
    msgs = conversation(50, parts=False)[1:]
    got = ct.render(ct.compile_template(ct.GEMMA_TEMPLATE), msgs, bos_token="<bos>", eos_token="<eos>")
    assert got == plain_render(ct.GEMMA_TEMPLATE, msgs).replace("<s>", "<bos>", 1)
    got = ct.render(ct.compile_template(ct.GEMMA4_TEMPLATE), msgs, bos_token="<bos>", eos_token="<eos>")
    assert got == plain_render(ct.GEMMA4_TEMPLATE, msgs).replace("<s>", "<bos>", 1) and "<|turn>model\n" in got
    ct.check_template(ct.compile_template(ct.GEMMA4_TEMPLATE), model="gemma4")
    assert [ct.fallback_template(a)[1] for a in ("gemma4", "gemma4_text", "gemma3", "llama")] == [
        "Gemma 4 turns", "Gemma 4 turns", "Gemma turns", "ChatML"]


def test_a_long_conversation_is_within_the_bounds():
    """The size bound grows with the conversation: 4 MB of messages render."""
    msgs = conversation(2000, size=2000)
    out = ct.render(ct.compile_template(REALISTIC), msgs, bos_token="", eos_token="", tools=TOOLS)
    assert len(out) > 4_000_000


def test_recursive_loops_and_loop_controls_still_work():
    source = ("{% for item in tree recursive %}[{{ item.name }}{% if item.children %}{{ loop(item.children) }}"
              "{% endif %}]{% endfor %}|{% for i in range(10) %}{% if i == 3 %}{% continue %}{% endif %}"
              "{% if i == 6 %}{% break %}{% endif %}{{ i }}{{ loop.length }}{% endfor %}")
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}, {"name": "c", "children": []}]
    got = ct.render(ct.compile_template(source), [], bos_token="", eos_token="", tree=tree)
    assert got == "[a[b]][c]|010110210410510"


# -- through a real backend's load --------------------------------------------------------------


@pytest.mark.slow
def test_llamacpp_load_refuses_a_config_template_over_the_bounds():
    pytest.importorskip("llama_cpp")
    from assistant.config.models import resolve_model
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend()
    with pytest.raises(ModelLoadError, match="the chat template ran longer than"):
        b.load(str(resolve_model("smollm2-135m").path),
               LoadOptions(n_ctx=256, n_threads=1, chat_template=BOMBS["nested loops"]))


@pytest.mark.slow
async def test_daemon_refuses_a_model_whose_template_is_over_the_bounds_and_keeps_serving(daemon_factory):
    """A model alias with a template that never ends: models.load says why, naming the
    template's trouble, well within the bound, and the working model keeps serving."""
    import yaml

    from assistant.config.models import resolve_model
    from assistant.protocol import ErrorCode, RPCError

    config = {"threads": 2, "context": 2048, "preload": True,
              "models": {"evil": {"path": str(resolve_model("smollm2-135m").path),
                                  "chat_template": BOMBS["nested loops"]}}}
    d = daemon_factory(config_text=yaml.safe_dump(config)).start()
    async with await d.client() as c:
        with pytest.raises(RPCError) as info:
            await c.call("models.load", {"model": "evil"})
        assert info.value.code == ErrorCode.MODEL_LOAD_FAILED
        assert "the chat template ran longer than 2 s" in info.value.message
        reply = await (await c.chat(prompt="Say hi.", max_tokens=4, temperature=0.0)).result()
        assert reply["finish_reason"] in ("stop", "length")
    assert "Traceback" not in d.stderr()
