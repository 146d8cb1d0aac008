"""Bipartite (Hungarian) matching of predictions to ground-truth boxes, in JAX or on the host with SciPy.

DETR-style detectors (DETR, OWL-ViT) train each ground-truth box against exactly one prediction: the one-to-one
assignment of minimal total cost, for a cost ``[N, M]`` of ``N`` predictions against ``M`` targets (typically a
weighted sum of a class cost, an L1 box distance and ``-giou``). This module finds it two ways, with the contract of
``scipy.optimize.linear_sum_assignment``: ``(row_ind, col_ind)``, ``min(N, M)`` pairs, ``row_ind`` ascending.

* :func:`hungarian_matching`: pure JAX, static shapes, ``jit``- and ``vmap``-able; the shortest augmenting path
  algorithm with dual potentials (Jonker & Volgenant, 1987, in the form of Crouse, 2016, which is also SciPy's),
  ``O(n^2 m)`` for ``n = min(N, M)``, ``m = max(N, M)``: ``n`` augmentations, each a Dijkstra search of at most
  ``n`` steps over ``m`` columns, every step a few vector operations of length ``m``.
* :func:`scipy_matching`: SciPy's ``linear_sum_assignment`` on the host through ``jax.pure_callback`` (callable
  inside ``jit`` and ``vmap``; a batch goes to the host as one call).
* :func:`match`: either one, by name, for ``[..., N, M]``.

Padding. Ground truth is padded to a static count ``M`` with a validity mask ``target_valid [M]``.
:func:`masked_cost` gives the padded columns a constant cost larger than every real entry; the optimal assignment of
the masked cost restricted to the real targets is then an optimal assignment of the real targets alone (each padded
target is either free or takes a prediction no real target needs). :func:`assign_targets` does that, matches, and
returns what a loss wants: ``assigned_target [N]``, the real target of each prediction or ``-1``.

Costs. ``+inf`` marks a forbidden pair; both matchers find the optimum as long as some matching of ``min(N, M)``
pairs avoids every forbidden one. When none does, SciPy raises (``ValueError: cost matrix is infeasible``) while the
JAX matcher, which cannot raise under ``jit``, still ends and returns *some* one-to-one matching; NaN entries are
treated like ``+inf``. Large finite costs are fine: the result is optimal up to float round-off of the order of
``n * eps * max|cost|``, so two assignments whose totals differ by less than that may be swapped (use float64 to
resolve them). The cost is not differentiated (it passes through ``lax.stop_gradient``); gradients flow through the
loss evaluated at the matched pairs, as in DETR.

Speed. On CPU the JAX matcher takes about as long as SciPy for 64 predictions and 4 targets and about 3x longer for
36 targets (batch of 32; ``python -m tests.test_matching`` prints both). Its cost is the number of ``while_loop``
steps, which under ``vmap`` is the largest over the batch (about 180 for ``[32, 64, 36]``).

>>> import jax.numpy as jnp
>>> cost = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
>>> row_ind, col_ind = hungarian_matching(cost)
>>> row_ind.tolist(), col_ind.tolist(), float(cost[row_ind, col_ind].sum())
([0, 1, 2], [1, 0, 2], 5.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["hungarian_matching", "scipy_matching", "match", "masked_cost", "assign_targets", "METHODS"]

METHODS = ("jax", "scipy")


# ----------------------------------------------------------------------------------------------- checks


def _check_cost(cost, min_rank=2, max_rank=None):
    cost = jnp.asarray(cost)
    if cost.ndim < min_rank or (max_rank is not None and cost.ndim > max_rank):
        want = "[N, M]" if max_rank == 2 else "[..., N, M]"
        raise ValueError(
            f"cost must have shape {want} (N predictions by M targets), got shape {cost.shape}"
            + ("; vmap over a batch axis." if max_rank == 2 and cost.ndim > 2 else ".")
        )
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        cost = cost.astype(jnp.float32)
    return lax.stop_gradient(cost.astype(jnp.promote_types(cost.dtype, jnp.float32)))


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def _empty(cost):
    n = min(cost.shape[-2:])
    shape = cost.shape[:-2] + (n,)
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32)


# -------------------------------------------------------------------------------------------- JAX matcher


def _assign_rows(cost):
    """``[n, m]`` cost with ``n <= m`` -> ``[n]`` column of each row, a minimum-cost assignment of every row.

    Crouse's (2016) shortest augmenting path algorithm, SciPy's: dual potentials ``u`` (rows) and ``v`` (columns)
    keep every reduced cost ``cost[i, j] - u[i] - v[j] >= 0`` and every assigned pair at 0. Rows are added one at
    a time. For row ``cur`` a Dijkstra search grows a tree of rows ``on_row`` and columns ``on_col``:
    ``shortest[j]`` is the shortest reduced path length from ``cur`` to column ``j`` and ``path[j]`` the row
    before it; each step scans the row reached last, takes the nearest column not yet on the tree, and stops at the
    first free column (the sink). The potentials then absorb the distances, and the assignment flips along the path
    from the sink back to ``cur``: every row on it takes the column after it, ``cur`` one more column than before.
    """
    n, m = cost.shape
    dtype = cost.dtype
    inf = jnp.array(jnp.inf, dtype)

    def add_row(cur, state):
        u, v, row_of_col, col_of_row = state
        cur = jnp.asarray(cur, jnp.int32)

        def search_step(s):
            on_row, on_col, shortest, path, min_val, i, _ = s
            on_row = on_row.at[i].set(True)
            reduced = min_val + cost[i] - u[i] - v
            better = ~on_col & (reduced < shortest)
            path = jnp.where(better, i, path)
            shortest = jnp.where(better, reduced, shortest)
            candidates = jnp.where(on_col, inf, shortest)
            j = jnp.argmin(candidates).astype(jnp.int32)
            # No finite path left (an infeasible or NaN cost): take the first column off the tree, reached from row i,
            # so that the search and the flip still end in a one-to-one matching.
            j = jnp.where(on_col[j], jnp.argmin(on_col), j).astype(jnp.int32)
            path = path.at[j].set(jnp.where(path[j] < 0, i, path[j]))
            min_val = candidates[j]
            on_col = on_col.at[j].set(True)
            owner = row_of_col[j]
            free = owner < 0
            return on_row, on_col, shortest, path, min_val, jnp.where(free, i, owner), jnp.where(free, j, -1)

        init = (
            jnp.zeros(n, bool),
            jnp.zeros(m, bool),
            jnp.full(m, inf),
            jnp.full(m, -1, jnp.int32),
            jnp.zeros((), dtype),
            cur,
            jnp.int32(-1),
        )
        on_row, on_col, shortest, path, min_val, _, sink = lax.while_loop(lambda s: s[-1] < 0, search_step, init)

        # Potentials: a tree row gains min_val minus the distance to the column it holds (cur: min_val itself), a
        # tree column loses the same; reduced costs stay >= 0, and 0 along the new path.
        held = shortest[jnp.maximum(col_of_row, 0)]
        u = u + jnp.where(on_row, min_val - held, 0).at[cur].set(min_val)
        v = jnp.where(on_col, v - (min_val - shortest), v)

        def flip(s):
            row_of_col, col_of_row, j, _ = s
            i = path[j]
            previous = col_of_row[i]
            return row_of_col.at[j].set(i), col_of_row.at[i].set(j), previous, i == cur

        init = (row_of_col, col_of_row, sink, jnp.bool_(False))
        row_of_col, col_of_row, _, _ = lax.while_loop(lambda s: ~s[-1], flip, init)
        return u, v, row_of_col, col_of_row

    init = (jnp.zeros(n, dtype), jnp.zeros(m, dtype), jnp.full(m, -1, jnp.int32), jnp.full(n, -1, jnp.int32))
    return lax.fori_loop(0, n, add_row, init)[3]


def hungarian_matching(cost):
    """Minimum-cost one-to-one matching of rows to columns in pure JAX (``linear_sum_assignment``'s contract).

    Minimises ``sum_k cost[row_ind[k], col_ind[k]]`` over ``min(N, M)`` pairs with distinct rows and distinct
    columns. Static shapes throughout (a ``fori_loop`` over ``min(N, M)`` augmentations, each a ``while_loop``), so
    it runs inside ``jit``, and a batch runs with ``jax.vmap`` (see the example); ``O(n^2 m)`` with ``n = min(N,
    M)``, ``m = max(N, M)``. When ``N > M`` (more predictions than targets, the detection case) the targets are
    the ones assigned, on the transposed cost. ``+inf`` forbids a pair (see the module docstring for infeasible
    and NaN costs); ties are broken deterministically but not always as SciPy breaks them (the total cost is the
    same).

    Args:
      cost: ``[N, M]`` costs (integers are converted to float32). Not differentiated.

    Returns:
      ``(row_ind, col_ind)``: two ``[min(N, M)]`` int32 arrays, ``row_ind`` ascending.

    >>> import jax, jax.numpy as jnp
    >>> cost = jnp.array([[9.0, 1.0], [1.0, 9.0], [5.0, 5.0]])  # 3 predictions, 2 targets
    >>> [x.tolist() for x in hungarian_matching(cost)]
    [[0, 1], [1, 0]]
    >>> batch = jnp.stack([cost, cost[::-1]])  # [B, N, M]
    >>> [x.tolist() for x in jax.vmap(hungarian_matching)(batch)]  # row_ind [B, 2], col_ind [B, 2]
    [[[0, 1], [1, 2]], [[1, 0], [0, 1]]]
    """
    cost = _check_cost(cost, max_rank=2)
    num_rows, num_cols = cost.shape
    if min(num_rows, num_cols) == 0:
        return _empty(cost)
    if num_rows <= num_cols:
        return jnp.arange(num_rows, dtype=jnp.int32), _assign_rows(cost)
    row_of_col = _assign_rows(cost.T)  # each target (column) takes a prediction (row)
    order = jnp.argsort(row_of_col)
    return row_of_col[order].astype(jnp.int32), order.astype(jnp.int32)


# ------------------------------------------------------------------------------------------ SciPy matcher


def _scipy_host(cost):
    """``[..., N, M]`` NumPy costs -> ``[..., n]`` int32 ``row_ind`` and ``col_ind``, one SciPy call per matrix."""
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost)
    lead, (num_rows, num_cols) = cost.shape[:-2], cost.shape[-2:]
    n = min(num_rows, num_cols)
    flat = cost.reshape((-1, num_rows, num_cols))
    rows = np.zeros((len(flat), n), np.int32)
    cols = np.zeros((len(flat), n), np.int32)
    for b, c in enumerate(flat):
        rows[b], cols[b] = linear_sum_assignment(c)
    return rows.reshape(lead + (n,)), cols.reshape(lead + (n,))


def scipy_matching(cost):
    """``scipy.optimize.linear_sum_assignment`` on the host, callable inside ``jit`` and ``vmap``.

    One ``jax.pure_callback`` for the whole batch: leading axes of ``cost`` (and any ``vmap`` axes, which the
    callback receives as leading axes, ``vmap_method="expand_dims"``) are looped over on the host. SciPy accepts
    ``+inf`` for forbidden pairs as long as a full assignment exists; an infeasible or NaN cost makes it raise,
    which under ``jit`` surfaces as a runtime error of the callback. The device waits for the host: on an
    accelerator this is a transfer and a synchronisation per call.

    Args:
      cost: ``[..., N, M]`` costs. Not differentiated.

    Returns:
      ``(row_ind, col_ind)``: two ``[..., min(N, M)]`` int32 arrays, ``row_ind`` ascending.

    >>> import jax, jax.numpy as jnp
    >>> cost = jnp.array([[[9.0, 1.0], [1.0, 9.0], [5.0, 5.0]]])  # [B=1, N=3, M=2]
    >>> [x.tolist() for x in jax.jit(scipy_matching)(cost)]
    [[[0, 1]], [[1, 0]]]
    """
    cost = _check_cost(cost)
    if min(cost.shape[-2:]) == 0:
        return _empty(cost)
    n = min(cost.shape[-2:])
    out = jax.ShapeDtypeStruct(cost.shape[:-2] + (n,), jnp.int32)
    return jax.pure_callback(_scipy_host, (out, out), cost, vmap_method="expand_dims")


# ------------------------------------------------------------------------------------------- dispatcher


def match(cost, *, method: str = "jax"):
    """Minimum-cost matching of ``[..., N, M]`` costs with :func:`hungarian_matching` or :func:`scipy_matching`.

    Args:
      cost: ``[..., N, M]`` costs (any number of leading batch axes).
      method: ``"jax"`` (on the device, jittable; leading axes are vmapped) or ``"scipy"`` (on the host).

    Returns:
      ``(row_ind, col_ind)``: two ``[..., min(N, M)]`` int32 arrays, ``row_ind`` ascending.

    >>> import jax.numpy as jnp
    >>> cost = jnp.array([[[1.0, 2.0], [0.0, 5.0]], [[3.0, 1.0], [1.0, 3.0]]])
    >>> [x.tolist() for x in match(cost)]
    [[[0, 1], [0, 1]], [[1, 0], [1, 0]]]
    >>> [x.tolist() for x in match(cost, method="scipy")]
    [[[0, 1], [0, 1]], [[1, 0], [1, 0]]]
    """
    _check_method(method)
    cost = _check_cost(cost)
    if method == "scipy":
        return scipy_matching(cost)
    fn = hungarian_matching
    for _ in range(cost.ndim - 2):
        fn = jax.vmap(fn)
    return fn(cost)


# --------------------------------------------------------------------------------------------- padding


def _check_valid(cost, target_valid):
    target_valid = jnp.asarray(target_valid)
    want = cost.shape[:-2] + cost.shape[-1:]
    if target_valid.shape != want:
        raise ValueError(
            f"target_valid must have shape [..., M] = {want} (one flag per target column of cost {cost.shape}), "
            f"got {target_valid.shape}."
        )
    return target_valid.astype(bool)


def masked_cost(cost, target_valid):
    """``cost`` with every padded target column set to ``c = 2 max|finite real entries| + 1``, the same for all rows.

    Matching the masked cost and then dropping pairs with padded targets gives an optimal matching of the real
    targets alone: with ``N >= M`` the padded columns add the constant ``c`` per padded target whatever the real
    pairs are; with ``N < M``, ``c`` exceeds every real cost, so a prediction moves from a padded target to a free
    real one whenever there is one. Padded entries may hold anything (NaN, inf): they are replaced.

    Args:
      cost: ``[..., N, M]`` costs.
      target_valid: ``[..., M]`` booleans, True for a real target, False for padding.

    Returns:
      ``[..., N, M]`` costs, float32 or wider.

    >>> import jax.numpy as jnp
    >>> masked_cost(jnp.array([[1.0, -3.0, jnp.nan]]), jnp.array([True, True, False])).tolist()
    [[1.0, -3.0, 7.0]]
    """
    cost = _check_cost(cost)
    valid = _check_valid(cost, target_valid)[..., None, :]
    biggest = jnp.max(jnp.where(valid & jnp.isfinite(cost), jnp.abs(cost), 0), axis=(-2, -1), keepdims=True)
    return jnp.where(valid, cost, 2 * biggest + 1)


def assign_targets(cost, target_valid=None, *, method: str = "jax"):
    """The real target matched to each prediction, or ``-1``: what a DETR / OWL-ViT loss needs.

    Matches :func:`masked_cost` (when ``target_valid`` is given) with :func:`match`, and turns the pairs into one
    index per prediction: ``assigned_target[i] = j`` when prediction ``i`` is matched to real target ``j``, ``-1``
    when it is matched to nothing or to a padded target. Every real target gets exactly one prediction when
    ``N >= M``; otherwise ``N`` of them do.

    Args:
      cost: ``[..., N, M]`` costs of ``N`` predictions against ``M`` (padded) targets.
      target_valid: optional ``[..., M]`` booleans, False for padding; ``None``: all targets are real.
      method: ``"jax"`` or ``"scipy"`` (see :func:`match`).

    Returns:
      ``[..., N]`` int32 target indices in ``[-1, M)``.

    A loss then takes, per prediction, the class target ``labels[j]`` (or background where ``-1``) and the box loss
    where ``assigned_target >= 0``:

    >>> import jax.numpy as jnp
    >>> cost = jnp.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0], [0.4, 0.3, 0.0]])  # 4 preds, 3 slots
    >>> assign_targets(cost, jnp.array([True, True, False])).tolist()
    [1, 0, -1, -1]
    >>> assign_targets(cost).tolist()  # unmasked, the third slot takes a prediction
    [1, 0, 2, -1]
    """
    _check_method(method)
    cost = _check_cost(cost)
    if target_valid is not None:
        valid = _check_valid(cost, target_valid)
        cost = masked_cost(cost, valid)
    row_ind, col_ind = match(cost, method=method)
    if target_valid is not None:
        col_ind = jnp.where(jnp.take_along_axis(valid, col_ind, axis=-1), col_ind, -1)
    num_preds = cost.shape[-2]

    def scatter(rows, cols):
        return jnp.full(num_preds, -1, jnp.int32).at[rows].set(cols.astype(jnp.int32))

    for _ in range(cost.ndim - 2):
        scatter = jax.vmap(scatter)
    return scatter(row_ind, col_ind)
