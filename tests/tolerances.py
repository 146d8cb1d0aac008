"""Tolerances for tests that compare two computation orders of the same quantity.

Two orders of a float32 computation (one device or eight, one batch or micro-batches, chunked or materialised
attention, a scan or a Python loop) round differently, so their results differ by a few units of float32 round-off
of the *terms* that were summed, not of the result: a gradient entry that is a sum of large terms of both signs
(a token embedding used at many positions) can come out small, with an error far above ``eps * |result|``.

A test of such an equality therefore makes two checks:

* **the equality itself, in float64** (:func:`float64`, :func:`assert_float64_equal`): the same two computations on
  float64 inputs and parameters under ``jax.enable_x64(True)`` (what older jax called
  ``jax.experimental.enable_x64``) agree to ``1e-10`` relative to the magnitudes involved. A real bug (a wrong
  gradient, a missing ``psum``, a wrong mask) shows as a difference of order one; float64 round-off stays near
  ``1e-14``;
* **float32 is fine** (:func:`assert_float32_close`): the float32 results agree within
  ``atol = SAFETY * EPS32 * terms * scale``, where ``scale`` is the magnitude of the summed terms (by default the
  largest ``|value|`` of the compared arrays, or of all arrays of a tree when ``scale="tree"``) and ``terms`` is
  the growth of round-off along the longest chain of roundings: the depth of the computation times the length
  ``n`` of its longest reduction, or ``sqrt(n)`` for long sums of terms of both signs. Round-off of ``n`` summands
  is at most ``n * eps * sum|terms|`` (Higham, *Accuracy and Stability of Numerical Algorithms*, section 4.2) and
  typically ``sqrt(n) * eps * max|terms|``; each test states its choice and its measured margin stays far below 1.

Example:
    >>> import numpy as np
    >>> a = np.float32(1.0) + np.float32(1e-7)
    >>> assert_float32_close(a, 1.0, terms=1)
    >>> float32_atol(2.0, terms=10) == SAFETY * EPS32 * 10 * 2.0
    True
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 = 1.19e-7, the spacing of float32 numbers near 1
SAFETY = 4.0  # headroom over the bound's constant (it counts one rounding per operation; fused ops do a few)
FLOAT64_TOL = 1e-10  # two float64 orders agree to this, relative to the magnitudes involved


def float32_atol(scale, terms=1) -> float:
    """``SAFETY * EPS32 * terms * scale``: the absolute float32 round-off allowed between two computation orders.

    Args:
      scale: magnitude of the summed terms (e.g. the largest ``|value|`` of the quantity).
      terms: length of the longest chain of roundings (summands of the longest reduction times network depth).

    >>> float32_atol(1.0, terms=4) > 4 * EPS32
    True
    """
    if terms < 1:
        raise ValueError(f"terms={terms!r} must be >= 1 (the number of rounded operations in a chain)")
    return SAFETY * EPS32 * float(terms) * float(scale)


def adam_params_atol(*, steps, lr, adam_eps, grad_atol, param_scale) -> float:
    """Allowed difference of parameters after ``steps`` Adam(W) steps whose gradients differ by ``grad_atol``.

    Adam's step ``lr * m / (sqrt(v) + eps)`` changes by at most ``lr * dg / eps`` when the gradient entry changes by
    ``dg`` (the derivative of ``g / (|g| + eps)`` is at most ``1 / eps``, reached for ``g`` near 0, e.g. gradients that
    are identically zero but for round-off); over ``steps`` steps that adds up (to first order), plus the rounding
    of the parameters themselves (:func:`float32_atol` of ``param_scale`` per step).

    >>> round(adam_params_atol(steps=2, lr=1e-3, adam_eps=1e-6, grad_atol=1e-9, param_scale=0.0), 12)
    2e-06
    """
    return steps * (lr * grad_atol / adam_eps + float32_atol(param_scale))


def _max_abs(*arrays) -> float:
    return max((float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0) for a in arrays)


def assert_float32_close(got, want, *, terms, scale=None, err_msg=""):
    """``got`` and ``want`` agree within :func:`float32_atol` (``scale`` defaults to the largest ``|value|`` of both).

    >>> assert_float32_close(np.float32(3.0) * np.float32(1 / 3), 1.0, terms=2)
    """
    scale = _max_abs(got, want) if scale is None else float(scale)
    atol = float32_atol(scale, terms)
    np.testing.assert_allclose(
        np.asarray(got, np.float64),
        np.asarray(want, np.float64),
        rtol=0,
        atol=atol,
        err_msg=f"{err_msg} (float32 tolerance {atol:.3g} = {SAFETY} * eps32 * terms={terms} * scale={scale:.3g})",
    )


PARITY_TOL = 1e-5  # float32 parity with a reference framework (torch, PyG, diffusers), as the issues state it


def assert_matches_reference(got, want, *, tol=PARITY_TOL, err_msg=""):
    """float32 parity with another framework's implementation of the same formula, to ``tol`` *of the output's
    magnitude*: ``|got - want| <= tol * |want| + tol * max(1, max|want|)``.

    Two frameworks sum in different orders, so their float32 round-off is of the size of the largest terms, not of
    each element: an element near 0 of an output whose values reach 8 (a DiT's output; an RGCN weight gradient
    summed over 5000 edges) comes out with an absolute error of about ``1e-6 * 8`` whatever its own size. A fixed
    ``atol=1e-5`` therefore failed on one processor model and passed on another (DiT: error 1.17e-5 at an element of
    0.135, largest output 8.36, on an Intel Sapphire Rapids; 1.4e-6 of the output's magnitude). The bound scales
    with the output, never below the plain ``rtol=atol=tol`` comparison for outputs of magnitude 1 or less.

    >>> assert_matches_reference(np.float32([8.0, 1e-5]), np.float64([8.0, 0.0]))
    """
    want64 = np.asarray(want, np.float64)
    scale = max(1.0, _max_abs(want64))
    np.testing.assert_allclose(
        np.asarray(got, np.float64),
        want64,
        rtol=tol,
        atol=tol * scale,
        err_msg=f"{err_msg} (parity tolerance {tol:g} of the output's magnitude {scale:.3g})",
    )


def _named_leaves(tree):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _paired_leaves(got, want):
    a, b = _named_leaves(got), _named_leaves(want)
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    if names_a != names_b:
        raise AssertionError(f"the trees differ in structure: {names_a} vs {names_b}")
    return [(name, x, y) for (name, x), (_, y) in zip(a, b)]


def assert_trees_float32_close(got, want, *, terms, scale="leaf", err_msg=""):
    """Every leaf pair agrees within :func:`float32_atol`.

    ``scale="leaf"``: each leaf against its own largest ``|value|``; ``"tree"``: every leaf against the largest
    ``|value|`` of the whole of ``want`` (use it when leaves are sums of terms shared with larger leaves, e.g.
    parameters updated by a shared gradient clip); a number: that scale for all.

    >>> assert_trees_float32_close({"w": np.ones(3, np.float32)}, {"w": np.ones(3)}, terms=1)
    """
    leaves = _paired_leaves(got, want)
    if scale == "tree":
        scale = _max_abs(*[y for _, _, y in leaves])
    for name, x, y in leaves:
        assert_float32_close(x, y, terms=terms, scale=None if scale == "leaf" else scale, err_msg=f"{err_msg} {name}")


def assert_float64_equal(got, want, *, scale=None, err_msg=""):
    """Two float64 computation orders agree to :data:`FLOAT64_TOL` relative to ``scale`` (default: largest
    ``|value|``, at least 1e-300 so an all-zero pair passes only when exactly equal).

    >>> assert_float64_equal(np.float64(0.1) + 0.2, 0.3)
    """
    got, want = np.asarray(got), np.asarray(want)
    for name, arr in (("got", got), ("want", want)):
        if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float64:
            raise AssertionError(
                f"{err_msg}: {name} is {arr.dtype}, not float64 (run it under tests.tolerances.float64)"
            )
    scale = max(_max_abs(got, want), 1e-300) if scale is None else float(scale)
    np.testing.assert_allclose(
        got, want, rtol=0, atol=FLOAT64_TOL * scale, err_msg=f"{err_msg} (float64, scale {scale:.3g})"
    )


def assert_trees_float64_equal(got, want, *, scale="leaf", err_msg=""):
    """Every leaf pair agrees in float64 (:func:`assert_float64_equal`); ``scale`` as in
    :func:`assert_trees_float32_close`.

    >>> assert_trees_float64_equal({"w": np.ones(2)}, {"w": np.ones(2)})
    """
    leaves = _paired_leaves(got, want)
    if scale == "tree":
        scale = _max_abs(*[y for _, _, y in leaves])
    for name, x, y in leaves:
        assert_float64_equal(x, y, scale=None if scale == "leaf" else scale, err_msg=f"{err_msg} {name}")


def to_float64(tree):
    """Floating leaves cast to float64 (call inside :func:`float64`); other leaves unchanged.

    >>> with float64():
    ...     to_float64({"w": np.ones(2, np.float32), "i": np.arange(2)})["w"].dtype
    dtype('float64')
    """

    def cast(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x, jnp.float64)
        return x

    return jax.tree.map(cast, tree)


@contextlib.contextmanager
def float64():
    """``jax.enable_x64(True)``: inside it, float64 arrays stay float64 (jit caches are keyed on it).

    >>> with float64():
    ...     jnp.ones(2, jnp.float64).dtype
    dtype('float64')
    """
    with jax.enable_x64(True):
        yield
