"""The package's public surface: every re-exported name resolves to the object of its submodule."""

import importlib

import pytest

import mmjax


@pytest.mark.parametrize("name", sorted(mmjax._EXPORTS))
def test_reexported_name_is_the_submodule_object(name):
    module = importlib.import_module(f"mmjax.{mmjax._EXPORTS[name]}")
    assert getattr(mmjax, name) is getattr(module, name)


def test_submodules_are_reachable_and_unknown_names_raise():
    for name in mmjax._SUBMODULES:
        assert getattr(mmjax, name).__name__ == f"mmjax.{name}"
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = mmjax.no_such_thing
