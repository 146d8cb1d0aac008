"""A judge for generated images: a small CNN trained on real labelled images, whose predictions score what a
generator drew and whose penultimate features give a Frechet distance (:func:`mmjax.evaluate.frechet_distance`).

The one module of :mod:`mmjax.evaluate` that trains a model: the score of a generator is only as good as its judge,
so :func:`train_judge` reports the judge's own accuracy on real held-out images and that number is printed beside
every score it gives.

Input: ``uint8 [N, S, S, 3]`` (or ``[N, S, S]``) images, read as their brightness ``v = max(R, G, B) / 255``: the
judge sees shapes, not colours, so an item in a colour never seen with it in training (a red sneaker) is judged as
any other sneaker. Network (:class:`JudgeCNN`)::

    v [N, S, S, 1] -> conv3x3(32) -> ReLU -> avgpool 2 -> conv3x3(64) -> ReLU -> avgpool 2
                   -> flatten -> dense(features) -> ReLU    (the features)   -> dense(num_classes)   (the logits)

trained with Adam on the softmax cross-entropy, from a seed: the same images and seed give the same judge.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

from mmjax.errors import UserError

__all__ = ["JudgeCNN", "Judge", "train_judge"]


class JudgeCNN(nn.Module):
    """The judge's network; ``__call__(v [N, S, S, 1]) -> (logits [N, num_classes], features [N, features])``.

    >>> (logits, feats), _ = JudgeCNN(3, features=16).init_with_output(jax.random.key(0), np.zeros((2, 8, 8, 1)))
    >>> logits.shape, feats.shape
    ((2, 3), (2, 16))
    """

    num_classes: int
    features: int = 256

    @nn.compact
    def __call__(self, v):
        x = v
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        h = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(h), h


def _brightness(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise UserError(f"judge: images must be [N, S, S, 3] or [N, S, S] (square), got shape {images.shape}.")
    if images.dtype != np.uint8:
        raise UserError(f"judge: images must be uint8 pixels in [0, 255], got dtype {images.dtype}.")
    return images.max(axis=-1, keepdims=True).astype(np.float32) / 255.0


class Judge:
    """A trained :class:`JudgeCNN`: :meth:`predict` class ids, :meth:`features` for a Frechet distance.

    Attributes: ``params``, ``image_size``, ``num_classes``, ``accuracy`` (on the real images given to
    :func:`train_judge` as ``test``; ``None`` when none were).

    >>> model = JudgeCNN(2, features=8)
    >>> judge = Judge(model, model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)))["params"], image_size=8)
    >>> judge.predict(np.zeros((3, 8, 8, 3), np.uint8)).shape, judge.features(np.zeros((3, 8, 8), np.uint8)).shape
    ((3,), (3, 8))
    """

    def __init__(self, model: JudgeCNN, params, image_size: int, accuracy=None):
        self.model, self.params, self.image_size, self.accuracy = model, params, int(image_size), accuracy
        self._apply = jax.jit(lambda p, v: model.apply({"params": p}, v))

    def _run(self, images, batch_size: int = 1000):
        v = _brightness(images)
        if v.shape[1] != self.image_size:
            raise UserError(
                f"judge: images are {v.shape[1]}x{v.shape[1]}, the judge was trained on "
                f"{self.image_size}x{self.image_size}; resize them or train a judge at that size."
            )
        logits, feats = [], []
        for i in range(0, len(v), batch_size):
            chunk = v[i : i + batch_size]
            pad = batch_size - len(chunk) if len(v) > batch_size else 0  # one compiled shape for every chunk
            out = self._apply(self.params, np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)]))
            logits.append(np.asarray(out[0])[: len(chunk)])
            feats.append(np.asarray(out[1])[: len(chunk)])
        return np.concatenate(logits), np.concatenate(feats)

    def predict(self, images) -> np.ndarray:
        """``int [N]`` predicted class ids."""
        return np.argmax(self._run(images)[0], axis=1)

    def features(self, images) -> np.ndarray:
        """``float32 [N, features]`` penultimate (post-ReLU) features."""
        return self._run(images)[1]


def train_judge(
    images,
    labels,
    *,
    num_classes: int,
    test=None,
    num_steps: int = 600,
    batch_size: int = 128,
    lr: float = 1e-3,
    features: int = 256,
    seed: int = 0,
) -> Judge:
    """Trains a :class:`JudgeCNN` on real ``images`` (``uint8 [N, S, S, 3]``) with ``labels`` (``int [N]``).

    ``num_steps`` Adam steps on batches of ``batch_size`` drawn in a seeded order (epochs of a permutation);
    ``test = (images, labels)`` sets :attr:`Judge.accuracy`.

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 2, 64)
    >>> images = np.zeros((64, 8, 8, 3), np.uint8)
    >>> images[labels == 1, :4] = 255  # class 1: top half bright
    >>> judge = train_judge(images, labels, num_classes=2, test=(images, labels), num_steps=30, batch_size=16)
    >>> judge.accuracy, judge.features(images[:3]).shape
    (1.0, (3, 256))
    """
    v = _brightness(images)
    labels = np.asarray(labels)
    if labels.shape != (len(v),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"judge: labels must be int [{len(v)}] (one per image), got {labels.dtype} {labels.shape}.")
    if len(v) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"judge: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
    if not isinstance(num_steps, int) or num_steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"judge: num_steps and batch_size must be ints >= 1, got {num_steps!r}, {batch_size!r}.")
    if len(v) < batch_size:
        raise UserError(f"judge: {len(v)} training images are fewer than batch_size={batch_size}.")
    model = JudgeCNN(int(num_classes), int(features))
    params = model.init(jax.random.key(seed), v[:1])["params"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng([seed, 1])
    order = np.zeros(0, np.int64)
    for _ in range(num_steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(v))])
        idx, order = order[:batch_size], order[batch_size:]
        params, opt_state = step(params, opt_state, v[idx], labels[idx].astype(np.int32))
    judge = Judge(model, jax.device_get(params), v.shape[1])
    if test is not None:
        test_images, test_labels = test
        judge.accuracy = float(np.mean(judge.predict(test_images) == np.asarray(test_labels)))
    return judge
