"""Matching: the JAX Hungarian matcher and the SciPy callback against ``scipy.optimize.linear_sum_assignment``,
under jit and vmap, in float64 and float32, with padded targets, ties, large and forbidden costs, and the errors.

``python tests/test_matching.py`` prints the time of both matchers on detection-sized batches (nothing asserted).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mmjax import matching
from tests.tolerances import EPS32, float32_atol, float64

SHAPES = [(1, 1), (2, 2), (3, 5), (5, 3), (8, 8), (7, 1), (1, 7), (64, 4), (4, 64), (64, 36), (100, 36), (36, 100)]

hungarian = jax.jit(matching.hungarian_matching)
scipy_jit = jax.jit(matching.scipy_matching)


def reference(cost):
    """SciPy's optimum of one ``[N, M]`` cost: (row_ind, col_ind, total in float64)."""
    cost = np.asarray(cost, np.float64)
    rows, cols = linear_sum_assignment(cost)
    return rows, cols, cost[rows, cols].sum()


def assert_one_to_one(rows, cols, shape):
    rows, cols = np.asarray(rows), np.asarray(cols)
    n = min(shape)
    assert rows.shape == cols.shape == (n,) and rows.dtype == cols.dtype == np.int32
    assert np.all(np.diff(rows) > 0), f"row_ind not strictly ascending: {rows}"
    assert len(set(cols.tolist())) == n, f"a column is used twice: {cols}"
    assert rows.min(initial=0) >= 0 and rows.max(initial=0) < shape[0]
    assert cols.min(initial=0) >= 0 and cols.max(initial=0) < shape[1]


# ---------------------------------------------------------------------------------------- one matrix


@pytest.mark.parametrize("shape", SHAPES)
def test_jax_matcher_equals_scipy_float64(shape):
    """Distinct random costs have one optimal assignment: the JAX matcher finds SciPy's, pair for pair."""
    rng = np.random.default_rng(sum(shape))
    with float64():
        for _ in range(3):
            cost = rng.normal(size=shape)
            rows, cols = hungarian(cost)
            want_rows, want_cols, _ = reference(cost)
            assert_one_to_one(rows, cols, shape)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_array_equal(cols, want_cols)


@pytest.mark.parametrize("shape", SHAPES)
def test_jax_matcher_float32_reaches_the_optimal_total(shape):
    """In float32 the potentials round, so an assignment within round-off of the optimum may be returned instead:
    the total (recomputed in float64) is within ``n`` potential updates of ``eps32 * sum|cost|`` of SciPy's."""
    rng = np.random.default_rng(100 + sum(shape))
    for _ in range(3):
        cost = rng.uniform(0, 10, size=shape).astype(np.float32)
        rows, cols = hungarian(cost)
        assert_one_to_one(rows, cols, shape)
        _, _, best = reference(cost)
        got = np.asarray(cost, np.float64)[np.asarray(rows), np.asarray(cols)].sum()
        n = min(shape)
        assert best <= got + 1e-9
        assert got - best <= float32_atol(n * np.abs(cost).max(), terms=n), (got, best)


def test_small_example_by_hand():
    cost = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = matching.hungarian_matching(cost)  # eager, not jitted
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]


def test_empty_costs_give_no_pairs():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        for fn in (matching.hungarian_matching, matching.scipy_matching):
            rows, cols = fn(jnp.zeros(shape))
            assert rows.shape == cols.shape == (0,)
    assert matching.assign_targets(jnp.zeros((3, 0))).tolist() == [-1, -1, -1]


def test_integer_costs():
    cost = np.array([[3, 1], [1, 3], [2, 2]])
    for fn in (hungarian, scipy_jit):
        rows, cols = fn(cost)
        assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_ties_give_an_optimal_one_to_one_matching():
    """With many equal costs SciPy and the JAX matcher may pick different optima; the totals agree."""
    rng = np.random.default_rng(1)
    for shape in [(10, 7), (7, 10), (12, 12), (64, 4)]:
        for _ in range(5):
            cost = rng.integers(0, 3, size=shape).astype(np.float32)
            rows, cols = hungarian(cost)
            assert_one_to_one(rows, cols, shape)
            assert cost[np.asarray(rows), np.asarray(cols)].sum() == reference(cost)[2]
    rows, cols = hungarian(np.zeros((5, 3), np.float32))
    assert_one_to_one(rows, cols, (5, 3))


def test_large_finite_costs():
    rng = np.random.default_rng(2)
    with float64():
        cost = rng.normal(size=(40, 12)) * 1e6
        cost[rng.random(cost.shape) < 0.2] = 1e12  # "almost forbidden"
        rows, cols = hungarian(cost)
        want_rows, want_cols, _ = reference(cost)
        np.testing.assert_array_equal(cols, want_cols)
        np.testing.assert_array_equal(rows, want_rows)
    cost32 = (rng.uniform(0, 1, size=(30, 30)) * 1e7).astype(np.float32)
    rows, cols = hungarian(cost32)
    got = np.asarray(cost32, np.float64)[np.asarray(rows), np.asarray(cols)].sum()
    best = reference(cost32)[2]
    assert got - best <= float32_atol(30 * 1e7, terms=30)


def test_forbidden_pairs_are_avoided_when_possible():
    """+inf marks a forbidden pair: with a feasible matching both find the optimum; without one SciPy raises and
    the JAX matcher still returns a one-to-one matching (and so does a NaN cost)."""
    rng = np.random.default_rng(3)
    feasible = 0
    for shape in [(5, 5), (10, 4), (4, 10), (20, 20)]:
        for _ in range(10):
            cost = rng.normal(size=shape).astype(np.float32)
            cost[rng.random(shape) < 0.3] = np.inf
            rows, cols = hungarian(cost)
            assert_one_to_one(rows, cols, shape)
            try:
                _, _, best = reference(cost)
            except ValueError:  # infeasible
                continue
            feasible += 1
            got = np.asarray(cost, np.float64)[np.asarray(rows), np.asarray(cols)].sum()
            assert abs(got - best) <= float32_atol(min(shape) * np.abs(cost[np.isfinite(cost)]).max(), min(shape))
    assert feasible > 10
    nan_cost = rng.normal(size=(6, 4)).astype(np.float32)
    nan_cost[0] = np.nan
    nan_cost[:, 1] = np.nan
    assert_one_to_one(*hungarian(nan_cost), (6, 4))


# --------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("shape", [(5, 64, 4), (3, 100, 36), (4, 6, 9)])
def test_vmap_equals_scipy_per_item(shape):
    rng = np.random.default_rng(4)
    with float64():
        cost = rng.normal(size=shape)
        rows, cols = jax.jit(jax.vmap(matching.hungarian_matching))(cost)
        for b in range(shape[0]):
            want_rows, want_cols, _ = reference(cost[b])
            np.testing.assert_array_equal(rows[b], want_rows)
            np.testing.assert_array_equal(cols[b], want_cols)


def test_nested_vmap_and_match_over_leading_axes():
    rng = np.random.default_rng(5)
    with float64():
        cost = rng.normal(size=(2, 3, 6, 5))
        nested = jax.jit(jax.vmap(jax.vmap(matching.hungarian_matching)))(cost)
        for method in matching.METHODS:
            got = jax.jit(functools.partial(matching.match, method=method))(cost)
            for a, b in zip(got, nested):
                np.testing.assert_array_equal(a, b)
        for i in range(2):
            for j in range(3):
                np.testing.assert_array_equal(nested[1][i, j], reference(cost[i, j])[1])


def test_scipy_matching_under_jit_and_vmap():
    rng = np.random.default_rng(6)
    cost = rng.normal(size=(4, 3, 9, 5)).astype(np.float32)
    want = [[reference(cost[i, j])[:2] for j in range(3)] for i in range(4)]
    results = {
        "direct": matching.scipy_matching(cost),
        "jit": scipy_jit(cost),
        "vmap": jax.jit(jax.vmap(matching.scipy_matching))(cost),
        "vmap-vmap": jax.jit(jax.vmap(jax.vmap(matching.scipy_matching)))(cost),
        "vmap of [B, N, M]": jax.vmap(matching.scipy_matching, in_axes=1, out_axes=1)(cost),
    }
    for name, (rows, cols) in results.items():
        assert rows.shape == cols.shape == (4, 3, 5) and rows.dtype == jnp.int32, name
        for i in range(4):
            for j in range(3):
                np.testing.assert_array_equal(rows[i, j], want[i][j][0], err_msg=name)
                np.testing.assert_array_equal(cols[i, j], want[i][j][1], err_msg=name)


def test_the_cost_is_not_differentiated():
    """Gradients flow through the loss at the matched pairs, not through the matcher (as in DETR)."""
    rng = np.random.default_rng(7)
    pred = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)

    def loss(pred, method):
        cost = jnp.sum(jnp.abs(pred[:, None] - target[None]), -1)
        assigned = matching.assign_targets(cost, method=method)
        matched = assigned >= 0
        l1 = jnp.sum(jnp.abs(pred - target[jnp.maximum(assigned, 0)]), -1)
        return jnp.sum(jnp.where(matched, l1, 0.0)), assigned

    grads = {}
    for method in matching.METHODS:
        grads[method], assigned = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(pred, method)
        fixed = jnp.maximum(assigned, 0)
        by_hand = jax.grad(lambda p: jnp.sum(jnp.where(assigned >= 0, jnp.abs(p - target[fixed]).sum(-1), 0.0)))(pred)
        np.testing.assert_array_equal(grads[method], by_hand)
    np.testing.assert_array_equal(grads["jax"], grads["scipy"])


# --------------------------------------------------------------------------------------------- padding


def np_assign(cost, valid):
    """Per-prediction target index, -1 if none, from SciPy on the real columns only."""
    real = np.flatnonzero(valid)
    out = np.full(cost.shape[0], -1)
    if len(real):
        rows, cols = linear_sum_assignment(np.asarray(cost, np.float64)[:, real])
        out[rows] = real[cols]
    return out


@pytest.mark.parametrize("method", matching.METHODS)
@pytest.mark.parametrize("num_preds, num_slots", [(64, 4), (64, 36), (10, 10), (4, 10), (3, 10), (1, 5), (6, 1)])
def test_padded_targets_match_nothing(method, num_preds, num_slots):
    """Matching the masked cost equals matching the real targets alone, with garbage in the padded columns, and
    whether there are more real targets than predictions or fewer."""
    rng = np.random.default_rng(num_preds * 100 + num_slots)
    fn = jax.jit(functools.partial(matching.assign_targets, method=method))
    with float64():
        for num_real in sorted({0, 1, num_slots // 2, num_slots - 1, num_slots} - {-1}):
            cost = rng.uniform(-3, 5, size=(num_preds, num_slots))
            valid = np.zeros(num_slots, bool)
            valid[rng.permutation(num_slots)[:num_real]] = True
            cost[:, ~valid] = rng.choice([np.nan, np.inf, -np.inf, -1e30, 0.0], size=(num_preds, (~valid).sum()))
            got = np.asarray(fn(cost, valid))
            assert got.dtype == np.int32 and got.shape == (num_preds,)
            np.testing.assert_array_equal(got, np_assign(cost, valid), err_msg=f"{num_real} real targets")
            assert (got >= 0).sum() == min(num_preds, num_real)
            assert np.all(valid[got[got >= 0]])


@pytest.mark.parametrize("method", matching.METHODS)
def test_assign_targets_batched_with_masks(method):
    rng = np.random.default_rng(8)
    batch, num_preds, num_slots = 6, 16, 5
    cost = rng.normal(size=(batch, num_preds, num_slots)).astype(np.float32)
    valid = rng.random((batch, num_slots)) < 0.6
    valid[0] = False
    valid[1] = True
    got = jax.jit(functools.partial(matching.assign_targets, method=method))(cost, valid)
    by_vmap = jax.jit(jax.vmap(functools.partial(matching.assign_targets, method=method)))(cost, valid)
    assert got.shape == (batch, num_preds)
    np.testing.assert_array_equal(got, by_vmap)
    for b in range(batch):
        np.testing.assert_array_equal(got[b], np_assign(cost[b], valid[b]))
    assert (np.asarray(got[0]) == -1).all()


def test_masked_cost_is_above_every_real_entry():
    rng = np.random.default_rng(9)
    cost = rng.normal(size=(2, 4, 3)) * 10
    cost[0, 1, 0] = np.inf  # a forbidden real pair does not make the padding infinite
    valid = np.array([[True, True, False], [False, True, True]])
    with float64():
        got = np.asarray(matching.masked_cost(cost, valid))
    for b in range(2):
        real = cost[b][:, valid[b]]
        pad = got[b][:, ~valid[b]]
        np.testing.assert_array_equal(got[b][:, valid[b]], real)
        assert np.isfinite(pad).all() and len(np.unique(pad)) == 1
        assert pad.min() > np.abs(real[np.isfinite(real)]).max()


# ----------------------------------------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match=r"method must be one of \('jax', 'scipy'\), got 'lapjv'"):
        matching.match(jnp.zeros((2, 2)), method="lapjv")
    with pytest.raises(ValueError, match=r"method must be one of .* got 'hungarian'"):
        matching.assign_targets(jnp.zeros((2, 2)), method="hungarian")
    with pytest.raises(ValueError, match=r"cost must have shape \[\.\.\., N, M\].*\(3,\)"):
        matching.match(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"cost must have shape \[N, M\].*\(2, 3, 3\); vmap"):
        matching.hungarian_matching(jnp.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"cost must have shape"):
        matching.scipy_matching(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"target_valid must have shape \[\.\.\., M\] = \(3,\).*got \(4,\)"):
        matching.assign_targets(jnp.zeros((5, 3)), jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"target_valid must have shape \[\.\.\., M\] = \(2, 3\).*got \(3,\)"):
        matching.masked_cost(jnp.zeros((2, 5, 3)), jnp.ones(3, bool))


# ------------------------------------------------------------------------------------------------ timing


def _time(fn, x, repeats=50):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def print_timings():
    """Median and best milliseconds of one jitted batched matching, JAX matcher vs the SciPy callback."""
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}, eps32 {EPS32:.3g}")
    for shape in [(32, 64, 4), (32, 64, 36), (32, 100, 100)]:
        cost = jnp.asarray(rng.random(shape), jnp.float32)
        line = [f"{shape}:"]
        for method in matching.METHODS:
            fn = jax.jit(functools.partial(matching.assign_targets, method=method))
            median, best = _time(fn, cost)
            line.append(f"{method} {median:.3f} ms (best {best:.3f})")
        print("  ".join(line))


if __name__ == "__main__":
    print_timings()
