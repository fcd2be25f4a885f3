"""Old import paths that keep working for one release after a module moved (as ``timm.models.layers`` did
when it became ``timm.layers``): importing one warns once with the new path, then behaves exactly as the new
module (the same module object, so ``monkeypatch`` and pickles see one module, not a copy)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_module(old: str, new: str) -> None:
    """Make the module being imported as ``old`` the module ``new`` (called from ``old``'s own code)."""
    _warn(f"{old} moved to {new}; import it from there ({old} goes away in the next release)")
    sys.modules[old] = importlib.import_module(new)


def moved_names(old: str, homes: dict[str, str]):
    """A module ``__getattr__`` for a module that was split: each name is read from its new home
    (``homes``: name -> module), with a warning that says where it lives now."""

    def __getattr__(name: str):
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _warn(f"{old}.{name} moved to {home}; import it from there ({old} goes away in the next release)")
        return getattr(importlib.import_module(home), name)

    return __getattr__


def _warn(message: str) -> None:
    # stacklevel 3 points at the code that imported the old path (through alias_module or __getattr__).
    warnings.warn(message, DeprecationWarning, stacklevel=3)
