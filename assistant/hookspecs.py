"""Every hook a plugin can implement.

A plugin is a module (or object) with functions decorated with
``@assistant.hookimpl`` whose names are hook names below. Hooks that add
things take a ``register`` callback, as simonw/llm's do, rather than
returning lists. Every hook may also take ``settings``: the plugin's own
mapping from the ``plugins:`` section of the config (``{}`` if none).

Hooks that deal with the running daemon take ``context``, the plugin's
``assistant.plugin_api.PluginContext`` (one per plugin, the same object in
every hook): the plugin's public contract with the daemon (events, skills,
the model, state, tables). Hooks never get the daemon itself; a hook
written to the old ``daemon`` argument fails at load with a message
naming the new signature. A hook takes only the arguments it names.

A hook implementation may be a plain function or an ``async def``. Plain
functions for the lifecycle and event hooks run in a worker thread, so a
slow one never blocks the daemon. A hook that raises is logged with its
traceback and its plugin is marked failed; the daemon and the other plugins
go on.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("assistant")
hookimpl = pluggy.HookimplMarker("assistant")


@hookspec
def register_skills(register, context, settings):
    """Add skills: functions the TUI, automations and the model (as tools) can call.

    ``register(name, function, description="", parameters=None)``:

    - ``function(**arguments)`` may be sync or async and returns JSON-able data;
    - ``parameters`` is a JSON schema (an ``object`` schema whose properties
      are the keyword arguments); arguments are validated against it before
      the call, and a bad one is reported naming the field;
    - a name already taken by another plugin is refused.

    A skill that needs the daemon (state, the model, other skills) closes
    over ``context``; its async members work once the daemon serves.
    """


@hookspec
def register_methods(register, context, settings):
    """Add JSON-RPC methods to the daemon's protocol.

    ``register(name, handler, description="")`` where ``handler(params)``
    (sync or async) takes the request's params dict and returns the result.
    Raise ``assistant.protocol.RPCError`` for a protocol error; any other
    exception becomes an INTERNAL_ERROR naming the plugin. Core method names
    cannot be taken. Handlers close over ``context`` as skills do.
    """


@hookspec
def register_backends(register, settings):
    """Add inference backends: ``register(name, backend_class)``.

    ``backend_class`` implements ``backends.base.Backend``. The built-in
    llama.cpp and MLX backends register through this hook too.
    """


@hookspec
def register_drafters(register, settings):
    """Add speculative-decoding drafters: ``register(name, factory)``.

    See ``assistant.inference.speculative`` for the drafter interface. The built-in
    drafters register through this hook too.
    """


@hookspec
def register_commands(cli, settings):
    """Add CLI subcommands.

    ``cli`` is the argparse sub-parsers object of the ``assistant`` command:
    ``p = cli.add_parser("name", help=...)`` then
    ``p.set_defaults(func=handler)`` where ``handler(args) -> int``.
    """


@hookspec
def startup(context, settings):
    """The daemon is up and serving (the database is open); ``context`` is the
    plugin's ``PluginContext``. Run migrations, start background tasks here.

    Startup hooks run in the background, concurrently: a slow one delays
    neither serving nor the other plugins. A plugin that raises here is
    marked failed and gets no more hook calls.
    """


@hookspec
def shutdown(context, settings):
    """The daemon is stopping; release what ``startup`` took (the hooks get
    10 s in all). The context's connection to the daemon closes after."""


@hookspec
def on_event(event, context, settings):
    """A daemon event: ``event`` is ``{"type", "time", "source", "data"}``.

    Types the daemon emits: ``daemon.started``, ``daemon.stopping``,
    ``model.loaded``, ``model.unloaded``, ``chat.finished``, ``plugin.failed``;
    plugins emit their own with ``context.emit(type, data)`` (source: the
    plugin's name; for example ``file.changed``, ``automation.run``). Called
    for every event, this plugin's own included; filter on ``event["type"]``.
    """
