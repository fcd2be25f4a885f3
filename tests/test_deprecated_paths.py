"""Code written against the old flat layout keeps working for one release: every old module path still
imports, gives the very objects of its new home, and warns with a DeprecationWarning that names the new path.
The public API (``adn.__all__``) and the imports the docs show are unchanged."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

import adn

SOURCE = Path(adn.__file__).parent
OLD_MODULES = sorted(path.stem for path in SOURCE.glob("*.py") if "utils.deprecated import" in path.read_text())


def _fresh_import(name: str):
    """Import ``name`` as if for the first time in this process, recording the warnings it gives."""
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_there_are_old_paths_to_check():
    assert {"train", "distill", "checkpoint", "layers", "export", "reproduce"} <= set(OLD_MODULES)


@pytest.mark.parametrize("old", OLD_MODULES)
def test_an_old_module_path_still_works_and_says_where_it_moved(old):
    module, caught = _fresh_import(f"adn.{old}")
    if hasattr(module, "__getattr__") and module.__name__ == f"adn.{old}":  # split: names read from new homes
        text = (SOURCE / f"{old}.py").read_text()
        names = [
            line.split('"')[1] for line in text.splitlines() if line.strip().startswith('"') and '": "adn.' in line
        ]
        assert names, f"adn.{old} lists no moved names"
        for name in names:
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                value = getattr(module, name)
            home = next(line.split('"')[3] for line in text.splitlines() if line.strip().startswith(f'"{name}":'))
            assert value is getattr(importlib.import_module(home), name)
            assert any(home in str(w.message) for w in got if issubclass(w.category, DeprecationWarning)), name
        with pytest.raises(AttributeError, match="no attribute"):
            module.no_such_name  # noqa: B018
    else:  # moved whole: the old name is the new module object itself
        assert module.__name__ != f"adn.{old}", f"adn.{old} is neither an alias nor a split module"
        assert caught and module.__name__ in str(caught[0].message)
        assert sys.modules[f"adn.{old}"] is module


def test_the_imports_the_docs_show_keep_working():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from adn.distill import SubPathDistillationLoss
        from adn.train import adn_step
        from adn.training.methods import adn_step as new_adn_step
    from adn.core.distill import SubPathDistillationLoss as new_loss

    assert adn_step is new_adn_step and SubPathDistillationLoss is new_loss
    importlib.import_module("adn.lm.model")


def test_every_public_name_resolves():
    missing = [name for name in adn.__all__ if not hasattr(adn, name)]
    assert not missing, f"adn.__all__ names that do not resolve: {missing}"
