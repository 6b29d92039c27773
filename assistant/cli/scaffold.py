"""``assistant plugins new NAME``: a working plugin package to start from.

It has a pyproject with the entry point, one skill written against the
plugin API (``assistant.plugin_api.PluginContext``: state, events, a
logger), and one test that starts a real daemon with the plugin (through
``assistant.testing``) and calls the skill over the socket.
"""

from __future__ import annotations

import re
from pathlib import Path


class ScaffoldError(Exception):
    pass


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "An assistant plugin: {name}"
requires-python = ">=3.10"
dependencies = ["local-assistant"]

[project.optional-dependencies]
test = ["pytest", "pytest-asyncio"]

# This line is what makes the assistant find the plugin once it is installed.
[project.entry-points."assistant.plugins"]
{name} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]

[tool.pytest.ini_options]
asyncio_mode = "auto"
'''

MODULE = '''\
"""{name}: an assistant plugin.

Hooks are plain functions marked with @hookimpl; see the hook reference in
the assistant's docs/plugins.md. Hooks that deal with the running daemon
take `context`, this plugin's PluginContext (its whole API: settings, log,
emit, call_skill, chat, state, migrate, db, data_dir). Every hook may also
take `settings`, this plugin's section of the config (plugins: {{{name}: ...}}).
"""

from assistant import PluginContext, hookimpl

__version__ = "0.1.0"


def hello(name: str, excited: bool = False) -> str:
    """Greet someone."""
    return f"Hello, {{name}}{{'!' if excited else '.'}}"


@hookimpl
def register_skills(register, context: PluginContext):
    async def greet(name: str, excited: bool = False) -> str:
        # The plugin's own state: kept in the assistant's database, across restarts.
        count = await context.state.get("greetings", 0) + 1
        await context.state.set("greetings", count)
        context.emit("{name}.greeted", {{"name": name, "count": count}})  # clients subscribe to "{name}.*"
        return hello(name, excited)

    register(
        "{name}.hello",
        greet,
        description="Greet someone by name.",
        parameters={{
            "type": "object",
            "properties": {{
                "name": {{"type": "string", "description": "who to greet"}},
                "excited": {{"type": "boolean", "default": False}},
            }},
            "required": ["name"],
            "additionalProperties": False,
        }},
    )


@hookimpl
async def startup(context: PluginContext):
    context.log.info("%s ready (%d greetings so far)", context.name, await context.state.get("greetings", 0))
'''

CONFTEST = '''\
# Fixtures that start a real assistant daemon with this plugin.
pytest_plugins = ["assistant.testing"]
'''

TEST = '''\
from {module} import hello


def test_hello_directly():
    assert hello("Ada") == "Hello, Ada."


async def test_hello_over_the_socket(assistant_daemon_factory):
    daemon = assistant_daemon_factory(plugins=["{name}"])
    async with await daemon.client() as client:
        skills = {{s["name"] for s in (await client.call("skills.list"))["skills"]}}
        assert "{name}.hello" in skills
        reply = await client.call("skills.call", {{"name": "{name}.hello", "arguments": {{"name": "Ada", "excited": True}}}})
    assert reply["result"] == "Hello, Ada!"
'''

README = '''\
# {dist}

An assistant plugin.

    pip install -e .          # the assistant finds it through its entry point
    assistant plugins list    # shows {name}
    assistant skills call {name}.hello '{{"name": "Ada"}}'
    pytest                    # starts a real daemon with the plugin
'''


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package ``assistant-NAME`` under ``parent``; returns its folder."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ScaffoldError(f"plugin name {name!r}: use letters, digits, '-' and '_', starting with a letter")
    slug = name.lower().replace("-", "_")
    module = f"assistant_{slug}"
    dist = f"assistant-{slug.replace('_', '-')}"
    root = parent / dist
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    values = {"name": slug, "module": module, "dist": dist}
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(**values))
    (root / f"{module}.py").write_text(MODULE.format(**values))
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    (root / "tests" / f"test_{slug}.py").write_text(TEST.format(**values))
    (root / "README.md").write_text(README.format(**values))
    return root
