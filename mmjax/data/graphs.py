"""Images as graphs: one node per ``p x p`` patch (pixel intensities + patch-centre position), edges between
spatially neighbouring patches (4- or 8-neighbour grid), in the spirit of the superpixel graph benchmarks of
Dwivedi et al. (2020) but with a regular patch grid, so every image of a size shares one edge set.

For ``H x W x C`` images and patch ``p``: ``P = (H/p) (W/p)`` nodes per image with ``p*p*C + 2`` features
(patch pixels in row-major order, then ``(row, col)`` of the patch centre scaled to ``[0, 1]``). Edges are listed
in both directions, no self loops. A batch of ``B`` images becomes one :class:`mmjax.graph.Graph` of ``B`` graphs.
Everything but :func:`grid_graph` (host-side, static) works under ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from mmjax.graph import Graph, batch

__all__ = ["grid_graph", "image_patches", "patch_positions", "images_to_graphs"]


@functools.lru_cache(maxsize=32)
def _grid_edges(rows: int, cols: int, neighbours: int):
    if neighbours == 4:
        offsets = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    else:
        offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    senders, receivers = [], []
    for r in range(rows):
        for c in range(cols):
            for dr, dc in offsets:
                rr, cc = r + dr, c + dc
                if 0 <= rr < rows and 0 <= cc < cols:
                    senders.append(rr * cols + cc)
                    receivers.append(r * cols + c)
    return np.asarray(senders, np.int32), np.asarray(receivers, np.int32)


def grid_graph(rows: int, cols: int, neighbours: int = 8, nodes=None) -> Graph:
    """A ``rows x cols`` grid graph (node ``r * cols + c``), edges to the 4 or 8 neighbours in both directions.

    Args:
      rows, cols: grid size.
      neighbours: 4 or 8.
      nodes: optional ``[rows * cols, F]`` features (default: zeros ``[rows * cols, 0]``).

    >>> g = grid_graph(2, 2)
    >>> g.n_node.tolist(), g.n_edge.tolist()
    ([4], [12])
    """
    if neighbours not in (4, 8):
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours!r}.")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}.")
    s, r = _grid_edges(int(rows), int(cols), int(neighbours))
    n = rows * cols
    nodes = np.zeros((n, 0), np.float32) if nodes is None else nodes
    return Graph(
        nodes=nodes,
        senders=s.copy(),
        receivers=r.copy(),
        n_node=np.array([n], np.int32),
        n_edge=np.array([len(s)], np.int32),
    )


def image_patches(images, patch: int):
    """Cut ``[B, H, W, C]`` images into non-overlapping patches: ``[B, (H/p)(W/p), p*p*C]`` (row-major patches).

    >>> import numpy as np
    >>> image_patches(np.arange(16.).reshape(1, 4, 4, 1), 2)[0, 1].tolist()
    [2.0, 3.0, 6.0, 7.0]
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"images must be [B, H, W, C], got shape {images.shape}; add a channel axis with x[..., None]."
        )
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch={patch} must divide the image size {h}x{w}.")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def patch_positions(rows: int, cols: int):
    """``[(rows * cols), 2]`` float32 ``(row, col)`` of each patch centre, scaled to ``[0, 1]``.

    >>> patch_positions(2, 2).tolist()
    [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pos = np.stack([r.ravel() / max(rows - 1, 1), c.ravel() / max(cols - 1, 1)], -1)
    return pos.astype(np.float32)


def images_to_graphs(images, patch: int = 4, neighbours: int = 8) -> Graph:
    """A batch of ``[B, H, W, C]`` images as one :class:`Graph` of ``B`` patch-grid graphs (``jit``-able).

    Node features ``[B * P, p*p*C + 2]``: patch pixels then patch-centre position. Edges: the grid's
    ``neighbours``-neighbourhood, offset per image; ``n_node = [P] * B``.

    >>> import numpy as np
    >>> g = images_to_graphs(np.zeros((3, 28, 28, 1), np.float32), patch=4)
    >>> g.nodes.shape, g.senders.shape, g.n_node.shape
    ((147, 18), (936,), (3,))
    """
    x = image_patches(images, patch)
    b, p, f = x.shape
    rows, cols = images.shape[1] // patch, images.shape[2] // patch
    pos = jnp.broadcast_to(jnp.asarray(patch_positions(rows, cols)), (b, p, 2)).astype(x.dtype)
    nodes = jnp.concatenate([x, pos], -1).reshape(b * p, f + 2)
    one = grid_graph(rows, cols, neighbours)
    many = batch([one] * b)
    return many._replace(nodes=nodes)
