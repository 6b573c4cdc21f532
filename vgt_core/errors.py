"""Exceptions with messages a user can act on."""

from __future__ import annotations

import difflib
from typing import Iterable


class VGTError(Exception):
    """Base class of vgt's own errors."""


class ConfigError(VGTError, ValueError):
    """A configuration (registry.yaml, preset, options) is invalid; the message names file, key and values."""


class ContractError(VGTError, TypeError):
    """A built component does not keep its protocol (``vgt_core.protocols``); the message names the plugin, the
    component and what is missing or of the wrong size."""


class UnknownComponentError(ConfigError, KeyError):
    """A component name that no plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], where: str = ""):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(unknown_name_message(f"{kind}", name, self.known, where))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def close_first(name: str, known: Iterable[str]) -> list[str]:
    """Known names ordered with the closest matches to ``name`` first."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=len(known), cutoff=0.5)
    return close + [k for k in known if k not in close]


def unknown_name_message(what: str, name: str, known: Iterable[str], where: str = "") -> str:
    known = close_first(name, known)
    prefix = f"{where}: " if where else ""  # where: "file: key.path" when the name came from a file
    listing = ", ".join(known) if known else "(none registered)"
    return f"{prefix}unknown {what} {name!r}; known: {listing}"
