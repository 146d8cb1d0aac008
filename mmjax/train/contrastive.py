"""Contrastive image-text training (CLIP, SigLIP, LiT) as a task of the engine (:mod:`mmjax.train.task`).

The loss on a global batch of ``B`` pairs with L2-normalised embeddings ``u_i`` (images) and ``v_i`` (texts) and the
learned temperature ``t = min(logit_scale, max_logit_scale)`` (CLIP clamps at ``log 100``) is::

    softmax (CLIP):  L = ( sum_i CE(e^t u_i V^T, i) + sum_i CE(e^t v_i U^T, i) ) / (2 B)
    sigmoid (SigLIP): L = -(1/B) sum_ij log sigmoid(z_ij (e^t u_i . v_j + b)),  z_ij = +1 if i == j else -1

with the negatives drawn from the *whole global batch* in every parallel mode (``mmjax.losses`` gathers them under
pmap; under single/sharded the batch is global already).

Options (``config.contrastive``):

* ``loss``: ``"softmax"`` or ``"sigmoid"``.
* ``freeze_image_tower`` (LiT, Zhai et al. 2022): the image tower (``vision/...`` and ``visual_projection``) is
  locked: ``stop_gradient`` on its parameters in the loss, and zero updates for them (no weight decay either)
  through :meth:`ContrastiveTask.wrap_optimizer` (``optax.multi_transform`` with ``optax.set_to_zero``), the hook
  the engine calls on its optimizer. The config is left as given (``config.optimizer.decay_rules`` is not
  rewritten).
* ``micro_batches``: exact gradient accumulation for a contrastive loss (GradCache, Gao et al. 2021,
  :func:`grad_cache`): embeddings of the whole batch are computed micro-batch by micro-batch without keeping
  activations, the loss and its gradient with respect to the embeddings use the full batch as negatives, and each
  micro-batch is then re-run with its embedding cotangents. Peak activation memory is one micro-batch's; the
  gradient equals the full-batch gradient. (The engine's ``optimizer.grad_accum_steps`` averages per-micro-batch
  losses, which is *not* the full-batch contrastive loss, so this task rejects it and says to use this option.)
* ``sigmoid_chunk_size``: the SigLIP loss visits texts in chunks (see :func:`mmjax.losses.sigmoid_contrastive_loss`).
* ``final_report``: after training, :meth:`ContrastiveTask.final_report` adds full-set retrieval recall, a linear
  probe and plots (on by default; single-process runs only).

Model (``config.model``): any :class:`mmjax.clip.CLIPConfig` fields, optionally starting from ``preset`` (a name in
:data:`mmjax.clip.CONFIGS`), plus ``dtype`` (``"float32"`` or ``"bfloat16"``: compute dtype; parameters, embeddings,
logits and the loss stay float32) and ``tokenizer`` (``"word"``: :class:`mmjax.tokenizer.WordTokenizer` built from the
training captions at a run's first start and saved with the run as ``workdir/vocab.json``, which a resumed run and
``mmjax eval`` read back, so the ids never depend on the data at hand; it also sets ``vocab_size`` and ``eot_id``; or
``"bpe"`` with ``bpe_path``: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` or a directory with CLIP's ``vocab.json`` and
``merges.txt``, local or ``gs://``; ``vocab_size`` and ``eot_id`` then default to the tokenizer's). ``remat=True``
rematerialises every encoder block.

Data (``config.data``): ``name`` is ``"fashion_mnist_captions"`` (:mod:`mmjax.data.captions`; evaluation adds
zero-shot accuracies, also on the held-out colour/item combinations), ``"folder"`` (``data_dir`` with images and a
captions file) or ``"tfds"`` (``tfds_name``, e.g. ``coco_captions``); see :mod:`mmjax.data.image_text`. Also:

* ``colour_space``: ``"rgb"`` (default) or ``"hsv"``: the image tower sees ``(hue, saturation, value)`` in
  ``[0, 1]`` (``dm_pix.rgb_to_hsv``, on device) before ``(x - mean) / std``. The value channel ``max(R, G, B)`` is the
  same for an item whatever its hue, so shape features need not be learned per colour; on the Fashion-MNIST
  captions this lifts accuracy on the held-out (colour, item) combinations (a supervised probe of the same tower:
  0.558 -> 0.747 with test accuracy unchanged, 0.823 -> 0.818).
* ``groups_per_batch`` (``G``, 0 = off) and ``group_by`` (Fashion-MNIST captions only): each batch is ``G`` groups
  of examples sharing the attributes ``group_by`` (default colour, size and position, i.e. captions that differ only
  in the item word), ``batch / G`` from each: in-batch hard negatives (:func:`mmjax.data.image_text.train_batches`).
  With uniform batches of 256 an example shares colour, size and position with about 3 others, so the loss rarely
  has to tell items apart; with ``G = 16`` with 15. ``subgroup_by`` / ``subgroups_per_group`` (``S``) split each
  drawn group once more: ``group_by=("size", "position")``, ``subgroup_by=("colour",)``, ``G = 8``, ``S = 2`` draws 8
  (size, position) places and 2 colours at each, 16 examples per (place, colour): hard negatives for the item within
  a colour and for the colour within a place. Grouping by (colour, size, position) alone leaves few pairs that differ
  only in colour, and zero-shot colour accuracy then sometimes collapsed (0.24 in one run).

>>> from mmjax.train.task import resolve_task_class
>>> resolve_task_class("contrastive").__name__
'ContrastiveTask'
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax.clip import CLIP, CLIPConfig, get_config
from mmjax.data import image_text
from mmjax.errors import ConfigError, UserError
from mmjax.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from mmjax.tokenizer import CLIPTokenizer, WordTokenizer
from mmjax.train import storage
from mmjax.train.parallel import split_micro_batches
from mmjax.train.task import init_model_params

__all__ = [
    "ContrastiveTask",
    "ImageTextData",
    "normalize_images",
    "caption_sources",
    "write_report",
    "grad_cache",
    "frozen_labels",
    "freeze",
    "read_vocab",
    "FROZEN_IMAGE_TOWER",
    "VOCAB_FILE",
]

#: The run's word vocabulary, in ``workdir`` (see :meth:`ContrastiveTask._word_tokenizer`).
VOCAB_FILE = "vocab.json"

#: Parameter paths (regex on "a/b/c") of the image tower that ``freeze_image_tower`` locks.
FROZEN_IMAGE_TOWER = r"(vision|visual_projection)(/.*)?"

LOSSES = ("softmax", "sigmoid")
DATASETS = ("fashion_mnist_captions", "folder", "tfds")
COLOUR_SPACES = ("rgb", "hsv")

_CONTRASTIVE_DEFAULTS = dict(
    loss="softmax", freeze_image_tower=False, micro_batches=1, sigmoid_chunk_size=0, final_report=True
)
_DATA_DEFAULTS = dict(
    name="fashion_mnist_captions",
    data_dir="",
    image_size=64,
    num_train=0,
    num_test=2000,
    num_heldout=2000,
    data_seed=0,
    tfds_name="",
    train_split="train",
    eval_split="test",
    image_key="image",
    caption_key="captions/text",
    captions_file="",
    eval_captions_file="",
    vocab_examples=20000,
    mean=0.5,
    std=0.5,
    groups_per_batch=0,
    group_by=("colour", "size", "position"),
    subgroup_by=(),
    subgroups_per_group=1,
    colour_space="rgb",
)
_MODEL_DEFAULTS = dict(name="clip", preset="", dtype="float32", tokenizer="word", bpe_path="")
_MODEL_KEYS = tuple(_MODEL_DEFAULTS)  # config.model keys besides the CLIPConfig fields


# ------------------------------------------------------------------------------------------------ GradCache
def grad_cache(embed_fn: Callable, num_micro_batches: int, groups: int = 1) -> Callable:
    """Wraps ``embed_fn(params, inputs, rng) -> embeddings`` so that it runs in micro-batches with exact gradients.

    ``inputs`` is a pytree of ``[b, ...]`` arrays, ``embeddings`` a pytree of ``[b, ...]`` arrays (row ``i`` from
    example ``i``). The returned function computes the embeddings of the ``num_micro_batches`` micro-batches of
    ``b / num_micro_batches`` examples one after another (``lax.map``), keeping no activations. Its VJP (a
    ``jax.custom_vjp``) receives the cotangents ``g`` of *all* embeddings - i.e. the gradient of a loss over the
    whole batch, negatives included - and re-runs each micro-batch ``k`` under ``jax.vjp``, adding up
    ``vjp_k(g_k)``. Since ``d loss / d params = sum_k (d e_k / d params)^T g_k`` exactly, the gradient equals the
    full-batch one (up to float round-off) at the memory cost of one micro-batch (Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup").

    The rows come back in micro-batch order (``split_micro_batches`` order, which keeps each of ``groups`` device
    blocks on its device under sharding): a fixed permutation of the examples, the same for every output, so
    paired rows stay paired. ``rng`` is folded with the micro-batch index (dropout is identical in both passes).
    ``inputs`` and ``rng`` get no gradient.

    >>> f = lambda p, x, rng: {"e": jnp.tanh(x @ p)}
    >>> p, x = jnp.ones((3, 2)), jnp.arange(12.0).reshape(4, 3) / 10
    >>> loss = lambda fn: lambda p: jnp.sum(jax.nn.log_softmax(fn(p, x, jax.random.key(0))["e"] @ p.T))
    >>> bool(jnp.allclose(jax.grad(loss(grad_cache(f, 2)))(p), jax.grad(loss(f))(p), atol=1e-6))
    True
    """
    k = int(num_micro_batches)
    if k < 1:
        raise UserError(f"config.contrastive.micro_batches={num_micro_batches!r} must be an int >= 1.")
    if k == 1:
        return embed_fn

    def chunks(inputs):
        return split_micro_batches(inputs, k, groups)

    def forward(params, inputs, rng):
        def one(xs):
            i, mb = xs
            return embed_fn(params, mb, jax.random.fold_in(rng, i))

        out = jax.lax.map(one, (jnp.arange(k), chunks(inputs)))  # leaves [k, b / k, ...]
        return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)

    @jax.custom_vjp
    def cached(params, inputs, rng):
        return forward(params, inputs, rng)

    def fwd(params, inputs, rng):
        return forward(params, inputs, rng), (params, inputs, rng)

    def bwd(residuals, g):
        params, inputs, rng = residuals
        g = jax.tree.map(lambda c: c.reshape((k, -1) + c.shape[1:]), g)

        def body(total, xs):
            i, mb, gk = xs
            _, vjp = jax.vjp(lambda p: embed_fn(p, mb, jax.random.fold_in(rng, i)), params)
            (grad,) = vjp(gk)
            return jax.tree.map(jnp.add, total, grad), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), chunks(inputs), g))
        return total, None, None

    cached.defvjp(fwd, bwd)
    return cached


# ------------------------------------------------------------------------------------------------- freezing
def frozen_labels(params: Any, pattern: str = FROZEN_IMAGE_TOWER) -> Any:
    """A pytree like ``params`` with ``"frozen"`` where the path ``"a/b/c"`` fully matches ``pattern``, else
    ``"trained"`` (the labels :func:`freeze` gives ``optax.multi_transform``).

    >>> frozen_labels({"vision": {"w": 0}, "text": {"w": 0}, "logit_scale": 0})
    {'logit_scale': 'trained', 'text': {'w': 'trained'}, 'vision': {'w': 'frozen'}}
    """
    import re

    from mmjax.train.optimizer import param_path

    regex = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if regex.fullmatch(param_path(path)) else "trained", params
    )


def freeze(tx: optax.GradientTransformation, params: Any, pattern: str = FROZEN_IMAGE_TOWER):
    """``tx`` for the parameters not matching ``pattern``, zero updates (``optax.set_to_zero``) for the others.

    >>> p = {"vision": jnp.ones(2), "text": jnp.ones(2)}
    >>> tx = freeze(optax.sgd(1.0), p)
    >>> u, _ = tx.update({"vision": jnp.ones(2), "text": jnp.ones(2)}, tx.init(p), p)
    >>> u["vision"].tolist(), u["text"].tolist()
    ([0.0, 0.0], [-1.0, -1.0])
    """
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels(params, pattern))


# ---------------------------------------------------------------------------------------------------- config
def _section(config, name: str, defaults: dict) -> ml_collections.ConfigDict:
    given = config.get(name, None) if hasattr(config, "get") else None
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    return ml_collections.ConfigDict({**defaults, **given})


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"config.{key}={value!r} is not valid; valid choices: {list(choices)}")


def _dtype(name):
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None, "": None}
    if name not in table:
        raise UserError(f"config.model.dtype={name!r} is not valid; valid choices: ['float32', 'bfloat16']")
    return table[name]


def _per_channel(key: str, value) -> np.ndarray:
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size not in (1, 3):
        raise UserError(f"config.data.{key}={value!r} must be a number or 3 numbers (per RGB channel)")
    return arr


def read_vocab(path: str) -> WordTokenizer:
    """The word tokenizer saved in ``path`` (a run's ``vocab.json``: a JSON list of the words after the specials).

    Raises:
      UserError: if the file is not such a list (naming the file and what to do).

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), VOCAB_FILE)
    >>> _ = open(path, "w").write(WordTokenizer.from_texts(["a red shirt"]).to_json())
    >>> read_vocab(path).vocab_size
    7
    >>> _ = open(path, "w").write('["a", "red"')  # cut short
    >>> read_vocab(path)
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: ...vocab.json is not a word vocabulary saved by mmjax (...
    """
    problem = None
    try:
        words = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"it is not valid JSON: {e}"
    else:
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            problem = f"expected a JSON list of words, got {type(words).__name__}"
    if problem is None:
        try:
            return WordTokenizer(words)
        except ValueError as e:
            problem = str(e)
    raise UserError(
        f"{path} is not a word vocabulary saved by mmjax ({problem}). It fixes the token ids the run's checkpoints "
        f"were trained with: restore it from a copy of the run; deleting it rebuilds it from the training captions, "
        "which gives other ids if they changed since (then use a fresh --workdir)"
    )


def run_word_tokenizer(workdir: str | None, texts) -> WordTokenizer:
    """A run's word vocabulary: read from ``workdir/vocab.json`` when the run has saved one (resume, ``mmjax eval``),
    else built from ``texts`` (a list of captions, or a function returning one, called only then) and saved there
    (atomically, by process 0), so that a checkpoint never depends on the data it was trained from.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> run_word_tokenizer(run, ["a red shirt"]).vocab_size, run_word_tokenizer(run, lambda: 1 / 0).vocab_size
    (7, 7)
    """
    saved = storage.join(storage.resolve(workdir), VOCAB_FILE) if workdir is not None else None
    if saved is not None and storage.exists(saved):
        return read_vocab(saved)
    tokenizer = WordTokenizer.from_texts(texts() if callable(texts) else texts)
    if saved is not None and jax.process_index() == 0:
        storage.write_text(saved, tokenizer.to_json() + "\n")
    return tokenizer


def _bpe_tokenizer(bpe_path) -> CLIPTokenizer:
    """:class:`mmjax.tokenizer.CLIPTokenizer` from ``config.model.bpe_path``: a local path or a URI (``gs://``...),
    which is copied to a local temporary directory first."""
    if not bpe_path:
        raise ConfigError(
            "config.model.tokenizer='bpe' needs config.model.bpe_path: OpenAI's bpe_simple_vocab_16e6.txt.gz (it "
            "ships in the open_clip_torch wheel: open_clip/bpe_simple_vocab_16e6.txt.gz) or a Hugging Face CLIP "
            "tokenizer directory (vocab.json + merges.txt); a gs:// path works too"
        )
    if not storage.is_uri(bpe_path):
        return CLIPTokenizer.from_pretrained(bpe_path)
    import tempfile

    remote = storage.path(bpe_path)
    if not remote.exists():
        raise ConfigError(f"config.model.bpe_path={bpe_path!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="mmjax-bpe-") as local:
        names = ["vocab.json", "merges.txt"] if remote.is_dir() else [None]
        target = local
        for name in names:
            source = remote / name if name else remote
            target = os.path.join(local, name or remote.name)
            with open(target, "wb") as f:
                f.write(source.read_bytes())
        return CLIPTokenizer.from_pretrained(local if remote.is_dir() else target)


def caption_sources(d) -> dict[str, Any]:
    """The image-text sources of ``config.data`` (``d``): ``{"train_source", "eval_source", "group_sizes",
    "vocab_texts"}``. For the Fashion-MNIST captions the evaluation source is the test split followed by the held-out
    (colour, item) combinations, with the attributes ``item``, ``colour``, ``size``, ``position`` and ``group``
    (0 test, 1 held-out) and ``group_sizes`` their sizes; ``vocab_texts`` are the captions the word tokenizer is built
    from (``None``: read lazily). Shared by the tasks that train on image-caption data (contrastive, captioning).

    >>> import os, tempfile, ml_collections
    >>> from mmjax.data import write_idx
    >>> data = tempfile.mkdtemp()
    >>> for prefix in ("train", "t10k"):  # one image of each of the ten items
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), np.full((10, 28, 28), 200, np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), np.arange(10, dtype=np.uint8))
    >>> d = ml_collections.ConfigDict({**_DATA_DEFAULTS, "data_dir": data, "image_size": 16, "num_test": 4,
    ...                                 "num_heldout": 4})
    >>> s = caption_sources(d)
    >>> len(s["train_source"]), len(s["eval_source"]), s["group_sizes"]
    (10, 8, [4, 4])
    """
    size = int(d.image_size)
    group_sizes = None
    if d.name == "fashion_mnist_captions":
        from mmjax.data.captions import make_captions

        train_source = image_text.fashion_mnist_captions(
            "train", int(d.num_train) or None, int(d.data_seed), size, d.data_dir or None
        )
        parts = [
            make_captions(s, int(n) or None, int(d.data_seed), image_size=size, data_dir=d.data_dir or None)
            for s, n in (("test", d.num_test), ("heldout", d.num_heldout))
        ]
        group_sizes = [len(p.captions) for p in parts]
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
        group = np.repeat(np.arange(2, dtype=np.int32), group_sizes)
        eval_source = image_text.ArrayImageText(
            cat("images"),
            parts[0].captions + parts[1].captions,
            item=cat("item"),
            colour=cat("colour"),
            size=cat("size"),
            position=cat("position"),
            group=group,
        )
        vocab_texts = train_source.all_captions()
    elif d.name == "folder":
        if not d.data_dir:
            raise UserError("config.data.name='folder' needs config.data.data_dir (a folder of images)")
        train_source = image_text.FolderImageText(d.data_dir, d.captions_file or None, size)
        eval_file = d.eval_captions_file or d.captions_file or None
        eval_source = image_text.FolderImageText(d.data_dir, eval_file, size)
        vocab_texts = train_source.all_captions()
    else:
        if not d.tfds_name:
            raise UserError("config.data.name='tfds' needs config.data.tfds_name (e.g. 'coco_captions')")
        kw = dict(data_dir=d.data_dir or None, image_key=d.image_key, caption_key=d.caption_key, image_size=size)
        train_source = image_text.TFDSImageText(d.tfds_name, d.train_split, **kw)
        eval_source = image_text.TFDSImageText(d.tfds_name, d.eval_split, **kw)
        vocab_texts = None  # read lazily, only for the word tokenizer
    return dict(train_source=train_source, eval_source=eval_source, group_sizes=group_sizes, vocab_texts=vocab_texts)


def write_report(report: dict[str, Any], workdir: str, title: str) -> dict[str, Any]:
    """Writes a final report to ``workdir/report.json``, prints it on one line (``TITLE report: k=v, ...``) and
    returns it.

    >>> import tempfile
    >>> out = write_report({"accuracy": 0.5, "png": "a.png"}, tempfile.mkdtemp(), "toy")
    toy report: accuracy=0.5000, png=a.png
    """
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(
        f"{title} report: "
        + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()),
        flush=True,
    )
    return report


def normalize_images(images, colour_space: str, mean, std):
    """uint8 ``[..., 3]`` RGB images as a model reads them: ``x = images / 255``, then ``(hue, saturation, value)``
    when ``colour_space == "hsv"`` (``dm_pix.rgb_to_hsv``), then ``(x - mean) / std`` (float32).

    >>> normalize_images(np.array([[255, 0, 0]], np.uint8), "hsv", 0.5, 0.5).tolist()
    [[-1.0, 1.0, 1.0]]
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    if colour_space == "hsv":
        x = pix.rgb_to_hsv(x)
    return (x - mean) / std


class ImageTextData:
    """The image-caption data side shared by the tasks that train on it (:class:`ContrastiveTask`,
    :class:`mmjax.train.captioning.CaptioningTask`): sources (:func:`caption_sources`), the run's word tokenizer,
    host batches ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` (grouped by attributes when
    ``config.data.groups_per_batch`` is set), evaluation batches with ``mask`` and the attributes, and the image
    normalisation (``colour_space``, ``mean``, ``std``).

    A subclass sets ``config``, ``workdir``, ``data_cfg``, ``batch_size``, ``eval_batch_size``, ``seed``, ``mean``,
    ``std`` (then calls ``_load_data()`` and ``_grouping()``) and ``tokenizer`` / ``context_length``.

    >>> sorted(m for m in vars(ImageTextData) if not m.startswith("__"))[:4]
    ['_grouping', '_host_batch', '_images', '_load_data']
    """

    def _load_data(self):
        for name, value in caption_sources(self.data_cfg).items():
            setattr(self, name, value)
        self.num_train_examples = len(self.train_source)
        self.has_attributes = "group" in self.eval_source[0]

    def _word_tokenizer(self) -> WordTokenizer:
        """The run's word vocabulary (:func:`run_word_tokenizer`), from the training captions."""
        texts = self.vocab_texts
        if texts is None:
            texts = lambda: self.train_source.all_captions(int(self.data_cfg.vocab_examples))  # noqa: E731
        return run_word_tokenizer(self.workdir, texts)

    def _host_batch(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "caption"}
        out["ids"] = self.tokenizer(batch["caption"], context_length=self.context_length)
        return out

    def train_batches(self, start_step: int):
        """Host batches ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` from ``start_step``."""
        for batch in image_text.train_batches(
            self.train_source, self.batch_size, self.seed, start_step, **self._batch_grouping
        ):
            yield {"image": batch["image"], "ids": self._host_batch(batch)["ids"]}

    def _grouping(self) -> dict:
        """``train_batches`` keywords for ``config.data.groups_per_batch``: Fashion-MNIST captions grouped by the
        attributes ``config.data.group_by`` (by default colour, size and position: the captions of a group differ
        only in the item word, hard negatives for the item)."""
        d = self.data_cfg
        g = d.groups_per_batch
        if not g:
            return {}
        if d.name != "fashion_mnist_captions":
            raise UserError(
                f"config.data.groups_per_batch={g!r} groups Fashion-MNIST captions by their attributes; "
                f"it is not available for data.name={d.name!r} (set it to 0)"
            )
        from mmjax.data.captions import ATTRIBUTES

        def cells(keys, what):
            keys = tuple(keys)
            empty = what == "group_by" and not keys
            if empty or any(k not in ATTRIBUTES for k in keys) or len(set(keys)) != len(keys):
                raise UserError(
                    f"config.data.{what}={keys!r} must be distinct attribute names from "
                    f"{list(ATTRIBUTES)}, e.g. ('size', 'position')"
                )
            cell = np.zeros(len(self.train_source), np.int64)
            for k in keys:
                cell = cell * len(ATTRIBUTES[k]) + self.train_source.extras[k]
            return cell

        out = dict(groups=cells(d.group_by, "group_by"), groups_per_batch=g)
        if tuple(d.subgroup_by):
            out.update(subgroups=cells(d.subgroup_by, "subgroup_by"), subgroups_per_group=d.subgroups_per_group)
        return out

    def eval_batches(self):
        """Ordered evaluation batches (first caption of each example), the last one padded, with ``mask``."""
        for batch in image_text.eval_batches(self.eval_source, self.eval_batch_size):
            yield self._host_batch(batch)

    def example_count(self, batch) -> int:
        """Real pairs in a host batch."""
        return int(np.sum(batch["mask"])) if "mask" in batch else int(np.shape(batch["image"])[0])

    def _images(self, images):
        return normalize_images(images, self.data_cfg.colour_space, self.mean, self.std)


class ContrastiveTask(ImageTextData):
    """Trains a :class:`mmjax.clip.CLIP` with a contrastive loss (see the module docstring for the options).

    Batches: ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, L]}`` (evaluation adds ``mask`` and, for the
    Fashion-MNIST captions, the attribute labels ``item``, ``colour``, ``size``, ``position`` and ``group`` - 0 for
    the test split, 1 for the held-out combinations).

    Evaluation (``eval_metrics``, summed by the engine): ``loss`` (the contrastive loss within each global eval batch,
    padding excluded), ``batch_i2t_top1`` / ``batch_t2i_top1`` (in-batch retrieval), and for the captions data the
    zero-shot accuracies ``item_accuracy``, ``colour_accuracy``, ``combo_accuracy`` (80-way colour+item) on the test
    split and ``heldout_item_accuracy``, ``heldout_colour_accuracy``, ``heldout_combo_accuracy`` on the held-out
    combinations (prompt-ensembled class embeddings, :data:`mmjax.data.captions.ZERO_SHOT_TEMPLATES`).
    :meth:`final_report` adds full-set retrieval recall, a linear probe and the plots.

    A one-block CLIP on 16x16 captioned images, made from ten Fashion-MNIST-format images written as IDX files:

    >>> import os, tempfile
    >>> from mmjax.data import write_idx
    >>> from mmjax.train.config import prepare_config
    >>> data = tempfile.mkdtemp()
    >>> for prefix in ("train", "t10k"):  # one image of each of the ten items
    ...     write_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte"), np.full((10, 28, 28), 200, np.uint8))
    ...     write_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte"), np.arange(10, dtype=np.uint8))
    >>> config = prepare_config({
    ...     "task": "contrastive", "batch_size": 4, "eval_batch_size": 4,
    ...     "model": {"name": "clip", "preset": "tiny", "context_length": 16, "vision_depth": 1, "text_depth": 1},
    ...     "data": {"name": "fashion_mnist_captions", "data_dir": data, "image_size": 16, "num_train": 8,
    ...              "num_test": 4, "num_heldout": 4},
    ...     "contrastive": {"final_report": False}})
    >>> task = ContrastiveTask(config)
    >>> batch = next(task.train_batches(0))
    >>> batch["image"].shape, batch["ids"].shape, batch["ids"].dtype
    ((4, 16, 16, 3), (4, 16), dtype('int32'))
    >>> params = jax.eval_shape(task.init_params, jax.random.key(0), batch)  # shapes only: nothing compiles
    >>> loss, metrics = jax.eval_shape(lambda p: task.loss(p, batch, jax.random.key(1), train=False), params)
    >>> sorted(params), loss.shape, loss.dtype
    (['logit_scale', 'text', 'text_projection', 'vision', 'visual_projection'], (), dtype('float32'))
    """

    unit = "pairs"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        """The task's sections with their defaults (merged under the engine's by
        :func:`mmjax.train.config.prepare_config`): ``model``, ``data`` and ``contrastive``.

        >>> c = ContrastiveTask.default_config()
        >>> c.model.name, c.data.name, c.contrastive.loss
        ('clip', 'fashion_mnist_captions', 'softmax')
        """
        return ml_collections.ConfigDict(
            {"model": dict(_MODEL_DEFAULTS), "data": dict(_DATA_DEFAULTS), "contrastive": dict(_CONTRASTIVE_DEFAULTS)}
        )

    @staticmethod
    def model_keys(model_config) -> tuple[str, ...]:
        """``config.model``'s valid keys: the :class:`mmjax.clip.CLIPConfig` fields and ``name``, ``preset``,
        ``dtype``, ``tokenizer``, ``bpe_path``.

        >>> "vision_width" in ContrastiveTask.model_keys({}), "tokenizer" in ContrastiveTask.model_keys({})
        (True, True)
        """
        del model_config
        return tuple(f.name for f in dataclasses.fields(CLIPConfig)) + _MODEL_KEYS

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        self.workdir = workdir  # the run's directory: the word vocabulary is saved there (VOCAB_FILE)
        self.opts = _section(config, "contrastive", _CONTRASTIVE_DEFAULTS)
        self.data_cfg = d = _section(config, "data", _DATA_DEFAULTS)
        _check_choice("contrastive.loss", self.opts.loss, LOSSES)
        _check_choice("data.name", d.name, DATASETS)
        _check_choice("data.colour_space", d.colour_space, COLOUR_SPACES)
        micro = self.opts.micro_batches
        if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
            raise UserError(f"config.contrastive.micro_batches={micro!r} must be an int >= 1 (1 = no accumulation)")
        accum = config.optimizer.get("grad_accum_steps", 1) if "optimizer" in config else 1
        if accum != 1:
            raise UserError(
                f"config.optimizer.grad_accum_steps={accum} splits the batch into independent contrastive losses "
                "(negatives only within a micro-batch); for exact accumulation set "
                f"config.contrastive.micro_batches={accum} and config.optimizer.grad_accum_steps=1"
            )
        self.batch_size, self.eval_batch_size = int(config.batch_size), int(config.eval_batch_size)
        self.seed = int(config.seed)
        self.mean, self.std = _per_channel("mean", d.mean), _per_channel("std", d.std)
        self._load_data()
        self._batch_grouping = self._grouping()  # checked here, with the other config values
        self._build_model(config.get("model", ml_collections.ConfigDict()))
        mode = config.parallel.mode if "parallel" in config else "single"
        if mode == "sharded":
            self.groups = int(config.parallel.num_devices or jax.device_count())
        else:
            self.groups = 1
        self._prompts = self._build_prompts()

    # -- data ---------------------------------------------------------------------------------------------------
    def _build_model(self, m):
        m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
        name = m.get("name", "clip")
        if name != "clip":
            raise ConfigError(
                f"config.model.name={name!r} is not valid for the contrastive task; valid choices: ['clip']"
            )
        kind = m.get("tokenizer", "word")
        _check_choice("model.tokenizer", kind, ("word", "bpe"))
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k not in _MODEL_KEYS}
        if kind == "word":
            self.tokenizer = self._word_tokenizer()
            fields.update(vocab_size=self.tokenizer.vocab_size, eot_id=self.tokenizer.eot_id)
            fields.setdefault("text_pooling", "eot")
        else:
            self.tokenizer = _bpe_tokenizer(m.get("bpe_path"))
            given = fields.get("vocab_size", get_config(m["preset"]).vocab_size if m.get("preset") else None)
            if given is not None and int(given) < self.tokenizer.vocab_size:
                raise ConfigError(
                    f"config.model.vocab_size={given} is smaller than the BPE vocabulary of "
                    f"config.model.bpe_path={m['bpe_path']!r} ({self.tokenizer.vocab_size} ids); "
                    f"set config.model.vocab_size={self.tokenizer.vocab_size}"
                )
            fields.setdefault("vocab_size", self.tokenizer.vocab_size)  # the text tower's rows: the tokenizer's ids
            fields.setdefault("eot_id", self.tokenizer.eot_id)
        fields.setdefault("image_size", int(self.data_cfg.image_size))
        if int(fields["image_size"]) != int(self.data_cfg.image_size):
            raise UserError(
                f"config.model.image_size={fields['image_size']} differs from config.data.image_size="
                f"{self.data_cfg.image_size}; set them equal"
            )
        base = get_config(m["preset"]) if m.get("preset") else CLIPConfig()
        try:
            self.clip_config = base.replace(**fields)
        except TypeError as e:
            raise UserError(f"config.model: {e}; valid keys: CLIPConfig fields and {list(_MODEL_KEYS)}") from e
        self.context_length = self.clip_config.context_length
        self.model = CLIP(self.clip_config, dtype=_dtype(m.get("dtype", "float32")))

    # -- model --------------------------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        """Initial CLIP params (shapes from one host batch)."""
        images, ids = self._images(jnp.asarray(batch["image"][:1])), jnp.asarray(batch["ids"][:1])
        return init_model_params(self.model, {"params": rng, "dropout": rng}, images, ids)

    def wrap_optimizer(self, tx, params):
        """Engine hook: with ``freeze_image_tower``, zero updates for the image tower (:func:`freeze`)."""
        return freeze(tx, params) if self.opts.freeze_image_tower else tx

    def _embed_fn(self, train: bool):
        model, freeze_image = self.model, bool(self.opts.freeze_image_tower)

        def embed(params, inputs, rng):
            image_params = params
            if freeze_image:
                image_params = dict(params)
                for name in ("vision", "visual_projection"):
                    image_params[name] = jax.lax.stop_gradient(params[name])
            r_img, r_txt = jax.random.split(rng)
            img = model.apply(
                {"params": image_params},
                self._images(inputs["image"]),
                normalize=True,
                train=train,
                method="encode_image",
                rngs={"dropout": r_img},
            )
            txt = model.apply(
                {"params": params}, inputs["ids"], None, True, train, method="encode_text", rngs={"dropout": r_txt}
            )
            return img, txt

        return embed

    def embeddings(self, params, batch, rng, *, train: bool = True):
        """``(image_embeds, text_embeds)``, both L2-normalised float32 ``[b, embed_dim]`` (GradCache when
        ``micro_batches > 1``: rows then come in micro-batch order, the same for both)."""
        fn = grad_cache(self._embed_fn(train), self.opts.micro_batches, self.groups)
        return fn(params, {"image": batch["image"], "ids": batch["ids"]}, rng)

    def log_scale(self, params):
        """``min(logit_scale, max_logit_scale)``: the clamped log-temperature the loss uses."""
        s = params["logit_scale"].astype(jnp.float32)
        cap = self.clip_config.max_logit_scale
        return s if cap is None else jnp.minimum(s, cap)

    def _pair_loss(self, params, img, txt, axis_name):
        if self.opts.loss == "softmax":
            return softmax_contrastive_loss(img, txt, self.log_scale(params), axis_name=axis_name)
        if "logit_bias" not in params:
            raise UserError(
                "config.contrastive.loss='sigmoid' needs a logit bias: set config.model.logit_bias_init "
                "(SigLIP uses -10, with logit_scale_init=log(10))"
            )
        chunk = int(self.opts.sigmoid_chunk_size) or None
        return sigmoid_contrastive_loss(
            img,
            txt,
            self.log_scale(params),
            params["logit_bias"].astype(jnp.float32),
            axis_name=axis_name,
            chunk_size=chunk,
        )

    def loss(self, params, batch, rng, *, train: bool = True, axis_name=None):
        """The contrastive loss of the global batch (identical on every device) and metrics (``logit_scale``,
        ``i2t_top1``: in-batch image->text top-1 of this device's rows)."""
        img, txt = self.embeddings(params, batch, rng, train=train)
        loss = self._pair_loss(params, img, txt, axis_name)
        img_sg, txt_sg = jax.lax.stop_gradient((img, txt))
        offset = 0
        if axis_name is not None:
            offset = jax.lax.axis_index(axis_name) * img.shape[0]
            txt_sg = jax.lax.all_gather(txt_sg, axis_name, tiled=True)
        top1 = jnp.mean(jnp.argmax(img_sg @ txt_sg.T, axis=-1) == offset + jnp.arange(img.shape[0]))
        return loss, {"logit_scale": jnp.exp(self.log_scale(params)), "i2t_top1": top1}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _build_prompts(self):
        """Token ids of the zero-shot prompts for the captions data: ``{attr: (ids [C * T, L], C, T)}``."""
        if not self.has_attributes:
            return {}
        from mmjax.data.captions import ATTRIBUTES, COLOUR_NAMES, ITEM_NAMES, ZERO_SHOT_TEMPLATES

        classes = {
            "item": ITEM_NAMES,
            "colour": COLOUR_NAMES,
            "combo": [f"{c} {i}" for i in ITEM_NAMES for c in COLOUR_NAMES],
        }  # combo = item * 8 + colour
        assert tuple(ATTRIBUTES["item"]) == tuple(ITEM_NAMES)
        out = {}
        for attr, names in classes.items():
            templates = ZERO_SHOT_TEMPLATES[attr]
            texts = [t.format(n) for n in names for t in templates]
            out[attr] = (self.tokenizer(texts, context_length=self.context_length), len(names), len(templates))
        return out

    def class_embeddings(self, params, attr: str):
        """Prompt-ensembled zero-shot classifier ``[C, embed_dim]`` for ``attr`` in ``{"item", "colour", "combo"}``:
        ``w_c = normalize(mean_t normalize(encode_text(template_t(c))))``."""
        ids, c, t = self._prompts[attr]
        emb = self.model.apply({"params": params}, jnp.asarray(ids), None, True, method="encode_text")
        mean = emb.reshape(c, t, -1).mean(axis=1)
        return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)

    def eval_metrics(self, params, batch, *, axis_name=None):
        """Sums over the real rows of one (device-local or global) eval batch; see the class docstring."""
        img, txt = self._embed_fn(False)(params, batch, jax.random.key(0))
        mask = batch["mask"].astype(jnp.float32)
        all_txt, all_img, all_mask, offset = txt, img, mask, 0
        if axis_name is not None:
            all_txt, all_img, all_mask = jax.lax.all_gather((txt, img, mask), axis_name, tiled=True)
            offset = jax.lax.axis_index(axis_name) * img.shape[0]
        scale = jnp.exp(self.log_scale(params))
        own = offset + jnp.arange(img.shape[0])
        dead = jnp.where(all_mask > 0, 0.0, -jnp.inf)  # padded columns are no negatives
        i2t = scale * img @ all_txt.T + dead
        t2i = scale * txt @ all_img.T + dead
        ce = lambda z: jax.nn.logsumexp(z, axis=-1) - z[jnp.arange(z.shape[0]), own]  # noqa: E731
        out = {
            "count": jnp.sum(mask),
            "loss": jnp.sum(mask * 0.5 * (ce(i2t) + ce(t2i))),
            "batch_i2t_top1": jnp.sum(mask * (jnp.argmax(i2t, -1) == own)),
            "batch_t2i_top1": jnp.sum(mask * (jnp.argmax(t2i, -1) == own)),
        }
        if self.has_attributes:
            # Accuracy within a group g of n_g examples: sum(w * correct) / count with w = N / n_g on its rows.
            total = float(sum(self.group_sizes))
            weights = [mask * (batch["group"] == g) * (total / max(n, 1)) for g, n in enumerate(self.group_sizes)]
            truth = {"item": batch["item"], "colour": batch["colour"], "combo": batch["item"] * 8 + batch["colour"]}
            for attr in ("item", "colour", "combo"):
                pred = jnp.argmax(img @ self.class_embeddings(params, attr).T, axis=-1)
                correct = (pred == truth[attr]).astype(jnp.float32)
                out[f"{attr}_accuracy"] = jnp.sum(weights[0] * correct)
                out[f"heldout_{attr}_accuracy"] = jnp.sum(weights[1] * correct)
        return out

    # -- final report -------------------------------------------------------------------------------------------
    def encode_source(self, params, source, batch_size: int | None = None):
        """Embeds a whole source on one device: ``(image_embeds [N, D], text_embeds [N, D])`` (first captions)."""
        batch_size = batch_size or self.eval_batch_size
        fn = jax.jit(lambda p, b: self._embed_fn(False)(p, b, jax.random.key(0)))
        imgs, txts = [], []
        for batch in image_text.eval_batches(source, batch_size, process_index=0, process_count=1):
            real = int(batch["mask"].sum())
            b = self._host_batch(batch)
            img, txt = jax.device_get(fn(params, {"image": b["image"], "ids": b["ids"]}))
            imgs.append(img[:real])
            txts.append(txt[:real])
        return np.concatenate(imgs), np.concatenate(txts)

    def final_report(self, params, workdir: str) -> dict[str, Any]:
        """Full-set evaluation after training (engine hook; also callable directly), written to
        ``workdir/report.json`` with PNG plots; returns the numbers and the file paths.

        Retrieval recall (R@1/5/10, both directions) on the evaluation set; for the captions data also zero-shot
        accuracies (item, colour, colour+item) on the test split and the held-out combinations via
        :mod:`mmjax.evaluate`, a ridge linear probe of the item on image embeddings, the item confusion matrix and a
        retrieval grid for held-out combination queries.
        """
        from mmjax import evaluate as ev

        if jax.process_count() > 1 or not self.opts.final_report:
            return {}
        params = jax.device_get(params)
        os.makedirs(workdir, exist_ok=True)
        img, txt = self.encode_source(params, self.eval_source)
        report: dict[str, Any] = {}
        for k, v in ev.retrieval_recall(img, txt, k=(1, 5, 10)).items():
            report[f"retrieval_{k}"] = v
        if self.has_attributes:
            from mmjax.data.captions import COLOUR_NAMES, HELDOUT_COMBOS, ITEM_NAMES, ZERO_SHOT_TEMPLATES

            enc = jax.jit(lambda p, ids: self.model.apply({"params": p}, ids, None, True, method="encode_text"))
            encode_text = lambda ids: np.asarray(enc(params, jnp.asarray(ids)))  # noqa: E731
            tok = lambda texts: self.tokenizer(texts, context_length=self.context_length)  # noqa: E731
            labels = {"item": self.eval_source.extras["item"], "colour": self.eval_source.extras["colour"]}
            labels["combo"] = labels["item"] * len(COLOUR_NAMES) + labels["colour"]
            names = {
                "item": ITEM_NAMES,
                "colour": COLOUR_NAMES,
                "combo": [f"{c} {i}" for i in ITEM_NAMES for c in COLOUR_NAMES],
            }
            group = self.eval_source.extras["group"]
            classifiers = {
                a: ev.zero_shot_classifier(encode_text, tok, names[a], ZERO_SHOT_TEMPLATES[a]) for a in names
            }
            for g, prefix in ((0, ""), (1, "heldout_")):
                rows = group == g
                for a in names:
                    acc = ev.zero_shot_accuracy(img[rows], classifiers[a], labels[a][rows], k=(1,))["top1"]
                    report[f"zero_shot_{prefix}{a}_accuracy"] = acc
            # linear probe: item from image embeddings, fitted on (up to) 5000 training images
            n_fit = min(5000, len(self.train_source))
            fit_idx = np.random.default_rng(0).permutation(len(self.train_source))[:n_fit]
            fit_src = image_text.ArrayImageText(
                self.train_source.images[fit_idx], [self.train_source.captions[i] for i in fit_idx]
            )
            fit_img, _ = self.encode_source(params, fit_src)
            probe = ev.linear_probe(
                fit_img,
                self.train_source.extras["item"][fit_idx],
                img[group == 0],
                labels["item"][group == 0],
                num_classes=len(ITEM_NAMES),
            )
            report["linear_probe_item_accuracy"] = probe["accuracy"]
            pred = np.argmax(img @ classifiers["item"].T, axis=1)
            cm = ev.confusion_matrix(labels["item"], pred, len(ITEM_NAMES))
            report["confusion_matrix_png"] = ev.plot_confusion_matrix(
                cm, ITEM_NAMES, os.path.join(workdir, "confusion_item.png"), title="zero-shot item (test + held-out)"
            )
            queries = [f"a large {c} {i} in the center" for c, i in HELDOUT_COMBOS[:5]]
            relevant = np.stack(
                [
                    (labels["item"] == ITEM_NAMES.index(i)) & (labels["colour"] == COLOUR_NAMES.index(c))
                    for c, i in HELDOUT_COMBOS[:5]
                ]
            )
            report["retrieval_grid_png"] = ev.plot_retrieval_grid(
                queries,
                encode_text(tok(queries)),
                img,
                self.eval_source.images,
                os.path.join(workdir, "retrieval_grid.png"),
                k=6,
                relevant=relevant,
            )
        else:
            queries = [self.eval_source[i]["captions"][0] for i in range(min(5, len(self.eval_source)))]
            images = np.stack([self.eval_source[i]["image"] for i in range(len(self.eval_source))])
            report["retrieval_grid_png"] = ev.plot_retrieval_grid(
                queries, txt[: len(queries)], img, images, os.path.join(workdir, "retrieval_grid.png"), k=5
            )
        report["corrupt_images_skipped"] = self.train_source.num_corrupt + self.eval_source.num_corrupt
        curves = os.path.join(workdir, "curves.png")
        if os.path.exists(curves) or self.config.get("plot", False):
            report["training_curve_png"] = curves
        report["checkpoint_dir"] = os.path.join(workdir, "checkpoints")
        return write_report(report, workdir, "contrastive")
