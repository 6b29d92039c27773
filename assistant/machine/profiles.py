"""Per-machine profiles: one config file that follows a person across machines.

The config's ``profiles:`` maps a name to a selector (``hostname`` and/or
``platform``) and the settings to use where it matches (``backend``,
``model``, ``threads``, ``context``)::

    profiles:
      laptop:
        platform: darwin-arm64      # any Apple Silicon Mac
        backend: mlx
        model: gemma                # an alias with paths: {mlx: ..., llama.cpp: ...}
      workstation:
        hostname: "build-*"         # glob, case-insensitive
        threads: 16
        context: 16384

Matching, in this order:

1. Profiles are tried in the order they appear in the file; the **first** one
   that matches applies and the rest are ignored (put specific profiles
   before general ones).
2. A profile matches when each selector it has matches: with both
   ``hostname`` and ``platform``, both must.
3. ``hostname`` is a glob (``fnmatch``) compared case-insensitively with the
   full hostname and with its short form (before the first dot), so
   ``ada-mbp`` matches ``ada-mbp.local``.
4. ``platform`` is a glob compared with ``<os>-<arch>`` as ``assistant
   doctor`` prints it (``darwin-arm64``, ``linux-x86_64``; aarch64 is
   written arm64) and with the bare OS name (``darwin``, ``linux``).

A matching profile's non-null settings replace the top-level ones; request
parameters (``--backend``, ``--model``...) and a model alias's own settings
still win over both, as they do over the top-level keys.

Everything here is a pure function of a ``Config`` and a ``Machine``, so it is
tested with any machine one likes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable

from backends import BUILTIN_BACKENDS

from assistant.config import Config, ConfigError, Profile
from assistant.machine.hardware import Machine

APPLIED_KEYS = ("backend", "model", "threads", "context")


@dataclass
class ProfileChoice:
    """Which profile applied (``name`` None: none did), why, and what it changed."""

    name: str | None
    reason: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _glob(pattern: str, *candidates: str) -> bool:
    pat = pattern.strip().lower()
    return any(fnmatch.fnmatchcase(c.lower(), pat) for c in candidates if c)


def matches(profile: Profile, machine: Machine) -> tuple[bool, str]:
    """Whether ``profile`` is for ``machine``, and what matched (or did not)."""
    if profile.hostname is None and profile.platform is None:
        return False, "it has neither hostname nor platform"
    said = []
    if profile.hostname is not None:
        host = machine.hostname or ""
        if not _glob(profile.hostname, host, host.split(".", 1)[0]):
            return False, f"hostname {host!r} does not match {profile.hostname!r}"
        said.append(f"hostname {host!r} matches {profile.hostname!r}")
    if profile.platform is not None:
        if not _glob(profile.platform, machine.platform_tag, machine.os):
            return False, f"platform {machine.platform_tag} does not match {profile.platform!r}"
        said.append(f"platform {machine.platform_tag} matches {profile.platform!r}")
    return True, " and ".join(said)


def select_profile(profiles: dict[str, Profile], machine: Machine) -> tuple[str, Profile, str] | None:
    """(name, profile, why) of the first profile, in file order, that matches; None if none does."""
    for name, profile in profiles.items():
        ok, why = matches(profile, machine)
        if ok:
            return name, profile, why
    return None


def check_profiles(config: Config, known_backends: Iterable[str] | None = None) -> None:
    """ConfigError for a profile that names a backend not in ``known_backends``.

    ``known_backends`` is the backend registry's names (default: the
    built-in backends); ``auto`` is always known. ``check_backends`` checks
    every backend key of a file read from disk, with its line; this also
    covers configs built in code."""
    known = ["auto", *(n for n in (BUILTIN_BACKENDS if known_backends is None else known_backends) if n != "auto")]
    for name, profile in config.profiles.items():
        if profile.backend is not None and profile.backend not in known:
            key = f"profiles.{name}.backend"
            raise ConfigError(f"unknown backend {profile.backend!r} (known: {', '.join(known)})",
                              path=config.source, line=config.lines.get(key), key=key)


def apply_profile(config: Config, machine: Machine, *,
                  known_backends: Iterable[str] | None = None) -> tuple[Config, ProfileChoice]:
    """The effective config on ``machine`` and which profile made it so.

    Returns a new ``Config`` (the one given is not changed) with the first
    matching profile's non-null settings in place of the top-level ones.
    Raises ``ConfigError`` for a profile naming a backend not in
    ``known_backends`` (the registry's names; default: the built-ins)."""
    check_profiles(config, known_backends)
    where = f"{machine.hostname or '?'} ({machine.platform_tag})"
    if not config.profiles:
        return config, ProfileChoice(None, "no profiles in the config")
    found = select_profile(config.profiles, machine)
    if found is None:
        return config, ProfileChoice(None, f"no profile matches {where}; the top-level settings apply")
    name, profile, why = found
    settings = {k: getattr(profile, k) for k in APPLIED_KEYS if getattr(profile, k) is not None}
    effective = dataclasses.replace(config, **settings)
    return effective, ProfileChoice(name, f"profile {name!r}: {why}", settings)
