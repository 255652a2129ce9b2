"""Finding the application's `Offload` from a `MODULE:ATTRIBUTE` spec, as workers are told."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from offload.app import Offload
from offload.errors import ConfigurationError


def load_offload(spec: str) -> Offload:
    """Import `module:attribute` (or `module`, holding exactly one Offload) and return it."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"{spec!r} is not MODULE:ATTRIBUTE; example: myapp.main:jobs")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"Cannot import {module_name!r} ({exc}); run from the directory that holds it"
            ) from exc
        raise
    if attribute:
        found: Any = module
        for part in attribute.split("."):
            found = getattr(found, part, None)
        if isinstance(found, Offload):
            return found
        return _only_offload(module, spec)
    return _only_offload(module, spec)


def _only_offload(module: ModuleType, spec: str) -> Offload:
    found = {id(v): v for v in vars(module).values() if isinstance(v, Offload)}
    if len(found) != 1:
        raise ConfigurationError(
            f"{spec!r}: expected one Offload instance in {module.__name__}, found {len(found)}; "
            "name it explicitly, e.g. myapp.main:jobs"
        )
    return next(iter(found.values()))
