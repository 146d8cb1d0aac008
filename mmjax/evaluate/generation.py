"""Evaluation of generated images: the Frechet distance between feature sets (FID on a classifier's features).

Computed on the host in float64 NumPy, as :mod:`mmjax.evaluate.embeddings`.
"""

from __future__ import annotations

import numpy as np

from mmjax.evaluate.embeddings import _as_2d, _check_same_dim

__all__ = ["frechet_distance"]


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two sets of features (FID when they are Inception features).

    ``d^2 = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` (Dowson & Landau 1982; Heusel et al. 2017), with
    the means and the unbiased covariances of the rows. ``Tr((C_a C_b)^(1/2))`` is computed as the sum of the square
    roots of the eigenvalues of the symmetric ``C_a^(1/2) C_b C_a^(1/2)`` (same spectrum), in float64: no complex
    parts to drop, as ``scipy.linalg.sqrtm`` of the non-symmetric product leaves.

    Args:
      features_a: ``[N_a, D]`` features (e.g. of generated images); at least 2 rows.
      features_b: ``[N_b, D]`` features (e.g. of real images); at least 2 rows.

    Returns:
      ``d^2`` as a float (>= 0 up to round-off; 0 for identical sets).

    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((5000, 3))
    >>> abs(frechet_distance(a, a)) < 1e-12, round(frechet_distance(a, a + [2.0, 0.0, 0.0]), 6)
    (True, 4.0)
    """
    a = _as_2d("features_a", features_a).astype(np.float64)
    b = _as_2d("features_b", features_b).astype(np.float64)
    _check_same_dim("features_a", a, "features_b", b)
    for name, x in (("features_a", a), ("features_b", b)):
        if len(x) < 2:
            raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {len(x)}.")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite values (NaN or inf); check the images or the feature model.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(c_a)
    cross = np.sqrt(np.maximum(np.linalg.eigvalsh(root_a @ c_b @ root_a), 0.0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(c_a) + np.trace(c_b) - 2.0 * cross)
