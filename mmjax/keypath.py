"""Setting one entry of a nested mapping by a dotted key: ``set_path(tree, "optimizer.lr", 0.1)``.

The one setter behind ``--config.a.b=value`` on the command line (:func:`mmjax.cli.apply_overrides`), the nested
parameter trees of :func:`mmjax.convert.hf_clip.unflatten_params` (``sep="/"``) and the tests' config overrides.
Missing sections are created (``dict`` in a dict, ``ConfigDict`` in a ``ConfigDict``); a part of the path that holds
a value rather than a section is an error.

>>> tree = {"optimizer": {"lr": 1.0}}
>>> set_path(tree, "optimizer.lr", 0.1)
{'optimizer': {'lr': 0.1}}
>>> set_path(tree, "data.name", "mnist")["data"]
{'name': 'mnist'}
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from mmjax.errors import ConfigError

__all__ = ["set_path"]


def _new_section(node: MutableMapping) -> MutableMapping:
    import ml_collections

    return ml_collections.ConfigDict() if isinstance(node, ml_collections.ConfigDict) else {}


def _store(node: MutableMapping, key: str, value: Any) -> None:
    if hasattr(node, "ignore_type"):  # a ConfigDict: a new value may change a field's type (None -> section)
        with node.ignore_type():
            node[key] = value
    else:
        node[key] = value


def set_path(
    tree: MutableMapping,
    key: str,
    value: Any,
    *,
    sep: str = ".",
    convert: Callable[[Any, Any], Any] | None = None,
    what: str = "config",
) -> MutableMapping:
    """Sets ``tree[a][b][c] = value`` for ``key="a.b.c"`` (parts split on ``sep``) and returns ``tree``.

    Sections on the way that are missing (or ``None``) are created. ``convert(old, value)``, when given, is called
    with the value already at the leaf (if there is one) and returns the value to store (e.g. a type coercion).
    ``what`` names the tree in errors.

    Raises:
      ConfigError: if a part of the path holds a value rather than a section, or a part is empty.

    >>> set_path({}, "a/b", 1, sep="/")
    {'a': {'b': 1}}
    >>> set_path({"a": 1}, "a.b", 2)
    Traceback (most recent call last):
    ...
    mmjax.errors.ConfigError: cannot set config.a.b: config.a is 1, not a section
    """
    parts = key.split(sep)
    if not all(parts):
        raise ConfigError(f"cannot set {what}.{key}: empty part in the key (expected names joined by {sep!r})")
    *parents, leaf = parts
    node = tree
    for i, part in enumerate(parents):
        child = node[part] if part in node else None
        if child is None:
            child = _new_section(node)
            _store(node, part, child)
            child = node[part]
        if not isinstance(child, MutableMapping) and not hasattr(child, "ignore_type"):
            where = sep.join(parents[: i + 1])
            raise ConfigError(f"cannot set {what}.{key}: {what}.{where} is {child!r}, not a section")
        node = child
    if convert is not None and leaf in node:
        value = convert(node[leaf], value)
    _store(node, leaf, value)
    return tree
