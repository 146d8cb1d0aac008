"""Every public module, function and class in ``mmjax`` has a docstring, and every public function and class a
``>>>`` example (which ``pytest --doctest-modules mmjax`` executes), apart from the short allowlist below.

"Public" means: a module whose dotted name has no part starting with ``_`` (``mmjax.__main__`` is skipped, it
only runs the CLI), and a function or class that such a module defines itself (``obj.__module__`` is the module),
whose name does not start with ``_``. Methods are not checked.
"""

import importlib
import inspect
import pkgutil

import pytest

import mmjax

# Public names without a ``>>>`` example, name -> one-line reason. Keep this short: an entry should need a dataset
# on disk that a temporary file cannot stand in for, a network, or several processes, and its docstring should say
# how to call it instead. Empty today: file readers write tiny IDX/JSON files to a temporary directory, and
# mmjax.train.distributed.initialize shows its single-process path.
NO_EXAMPLE: dict[str, str] = {}

SKIP_MODULES = {"mmjax.__main__"}


def _public_modules():
    names = ["mmjax"]
    for info in pkgutil.walk_packages(mmjax.__path__, prefix="mmjax."):
        if info.name in SKIP_MODULES or any(part.startswith("_") for part in info.name.split(".")):
            continue
        names.append(info.name)
    return sorted(names)


MODULES = _public_modules()


def _public_defs(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere; checked where it is defined
        yield f"{module.__name__}.{name}", obj


def _all_defs():
    return [item for name in MODULES for item in _public_defs(importlib.import_module(name))]


def _own_doc(obj):
    """The docstring written on ``obj`` itself (not one inherited from a base class)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return doc if isinstance(doc, str) else None


def missing_docstrings(defs):
    return [name for name, obj in defs if not (_own_doc(obj) or "").strip()]


def missing_examples(defs, allow=NO_EXAMPLE):
    return [name for name, obj in defs if name not in allow and ">>>" not in (_own_doc(obj) or "")]


def test_modules_are_found():
    assert {"mmjax.attention", "mmjax.train.loop", "mmjax.data.karate", "mmjax.convert.io"} <= set(MODULES)
    assert "mmjax.__main__" not in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_has_docstring(name):
    doc = importlib.import_module(name).__doc__
    assert doc and doc.strip(), f"module {name} has no docstring"


def test_public_defs_have_docstrings():
    defs = _all_defs()
    assert len(defs) > 50  # the walk found the package's functions and classes
    assert missing_docstrings(defs) == []


def test_public_defs_have_examples():
    assert missing_examples(_all_defs()) == []


def test_allowlist_is_current():
    """Every allowlisted name still exists, and still lacks an example (else it should leave the list)."""
    defs = dict(_all_defs())
    assert set(NO_EXAMPLE) <= set(defs), set(NO_EXAMPLE) - set(defs)
    stale = [name for name in NO_EXAMPLE if ">>>" in (_own_doc(defs[name]) or "")]
    assert stale == []


def test_checker_can_fail():
    def undocumented(x):
        return x

    def documented(x):
        """Identity.

        >>> documented(1)
        1
        """
        return x

    class Bare:
        pass

    class Sub(Bare):
        pass

    Bare.__doc__ = "A class with no example."
    defs = [("m.undocumented", undocumented), ("m.documented", documented), ("m.Bare", Bare), ("m.Sub", Sub)]
    assert missing_docstrings(defs) == ["m.undocumented", "m.Sub"]
    assert missing_examples(defs, allow={}) == ["m.undocumented", "m.Bare", "m.Sub"]
    assert missing_examples(defs, allow={"m.Bare": "reason"}) == ["m.undocumented", "m.Sub"]
