"""Image-text datasets for contrastive training: random-access sources, caption choice, batching, host sharding.

A *source* is random access: ``len(src)`` and ``src[i] -> {"image": uint8 [H, W, 3], "captions": tuple[str, ...],
**extras}`` where ``extras`` are integer attributes (labels for zero-shot evaluation; the Fashion-MNIST captions
carry ``item``, ``colour``, ``size``, ``position``, ``group``). Three kinds:

* :class:`ArrayImageText`: in-memory arrays (e.g. :func:`mmjax.data.captions.make_captions`).
* :class:`FolderImageText`: a folder of image files and a captions file (JSON lines or CSV) naming them.
* :class:`TFDSImageText`: a prepared TFDS dataset read with ``builder.as_data_source`` (ArrayRecord, no
  TensorFlow), e.g. ``coco_captions`` (``caption_key="captions/text"``).

Images are decoded with PIL (files and encoded bytes), converted to RGB, resized so the shorter side is
``image_size`` and centre-cropped to ``image_size x image_size``. A file that is missing or does not decode is
*skipped and counted*: the source returns the next readable example instead (deterministically, so batches stay a
function of ``(seed, step)``) and records the index in ``src.corrupt``; it raises only when nothing is readable.

Batching (:func:`train_batches`, through the host sharding of :class:`mmjax.data.pipeline.HostShare`, the same code
as the image-classification pipeline's)::

    order = grain.MapDataset.range(N)[process_index::process_count].shuffle(seed).repeat()
    batch(step) = [src[order[step * b + j]] for j < b],   b = global_batch // process_count
    caption of each example = one of its captions, drawn with numpy.random.default_rng([seed, step])

so each host reads only its own share and a resumed run sees exactly the batches of an uninterrupted one.
Evaluation batches (:func:`eval_batches`) keep the order, use the first caption, pad the last batch and mark real
rows in ``mask``.

>>> src = ArrayImageText(np.zeros((5, 8, 8, 3), np.uint8), ["a", "b", "c", "d", "e"], label=np.arange(5))
>>> b = next(train_batches(src, batch_size=4, seed=0))
>>> b["image"].shape, len(b["caption"]), b["label"].dtype
((4, 8, 8, 3), 4, dtype('int32'))
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmjax.data.pipeline import HostShare, padded_eval_batches, stack_records
from mmjax.errors import UserError
from mmjax.preprocess import center_crop, resize_shortest_side

__all__ = [
    "ArrayImageText",
    "FolderImageText",
    "TFDSImageText",
    "decode_image",
    "train_batches",
    "eval_batches",
    "fashion_mnist_captions",
]


def decode_image(image: Any, image_size: int | None = None) -> np.ndarray:
    """An image (array, PIL image, encoded bytes or path) -> ``uint8 [S, S, 3]`` RGB, ``S = image_size``.

    Resizes so the shorter side is ``image_size`` (bicubic) and centre-crops; ``image_size=None`` keeps the size.
    Raises ``ValueError`` (or PIL's ``OSError``) for data that is not an image.

    >>> decode_image(np.zeros((6, 10), np.uint8), 4).shape
    (4, 4, 3)
    """
    if isinstance(image, (bytes, bytearray, np.bytes_)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            pil = im.convert("RGB")
    elif isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            pil = im.convert("RGB")
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.dtype == object and arr.ndim == 0:  # a TFDS bytes scalar
            return decode_image(arr.item(), image_size)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise UserError(
                f"image must be uint8 [H, W], [H, W, 1|3|4], encoded bytes or a path; got dtype {arr.dtype} and "
                f"shape {arr.shape}."
            )
        if arr.ndim == 3 and arr.shape[-1] == 3 and (image_size is None or arr.shape[:2] == (image_size,) * 2):
            return np.ascontiguousarray(arr)
        pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).convert("RGB")
    if image_size is not None and pil.size != (image_size, image_size):
        pil = resize_shortest_side(pil, int(image_size))
        return np.ascontiguousarray(center_crop(np.asarray(pil), int(image_size)))
    return np.asarray(pil)


def _as_captions(value) -> tuple[str, ...]:
    """A caption field (str, bytes, or a sequence/array of them) -> a tuple of non-empty strings."""
    if isinstance(value, (str, bytes, np.bytes_, np.str_)):
        value = [value]
    out = []
    for v in np.asarray(value, dtype=object).reshape(-1).tolist():
        v = v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v)
        if v.strip():
            out.append(v)
    return tuple(out)


class _SkipsCorrupt:
    """Random access with corrupt/missing examples replaced by the next readable one (counted in ``corrupt``)."""

    max_skips = 1000

    def __len__(self) -> int:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    def _read(self, i: int) -> dict:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a source of {n} examples")
        i %= n
        errors = []
        for k in range(min(n, self.max_skips)):
            j = (i + k) % n
            if j in self.corrupt:
                continue
            try:
                return self._read(j)
            except (OSError, ValueError, KeyError, SyntaxError) as e:  # PIL raises OSError/SyntaxError
                self.corrupt.add(j)
                errors.append(f"{self._describe(j)}: {type(e).__name__}: {e}")
        raise UserError(
            f"{type(self).__name__}: no readable example found from index {i} ({len(self.corrupt)} corrupt so far); "
            f"first errors: {errors[:3]}"
        )

    def _describe(self, i: int) -> str:
        return f"example {i}"

    @property
    def num_corrupt(self) -> int:
        """How many examples were found unreadable (and skipped) so far."""
        return len(self.corrupt)

    def verify(self) -> int:
        """Reads every example once (marking unreadable ones) and returns the number of corrupt examples."""
        for i in range(len(self)):
            if i not in self.corrupt:
                try:
                    self._read(i)
                except (OSError, ValueError, KeyError, SyntaxError):
                    self.corrupt.add(i)
        return self.num_corrupt


class ArrayImageText(_SkipsCorrupt):
    """In-memory image-text pairs.

    Args:
      images: ``uint8 [N, H, W, 3]``.
      captions: ``N`` strings, or ``N`` sequences of strings (several captions per image).
      **extras: integer arrays ``[N]`` returned with each example (e.g. class labels).

    >>> src = ArrayImageText(np.zeros((2, 4, 4, 3), np.uint8), ["a cat", ["a dog", "a puppy"]], label=[3, 5])
    >>> src[1]["captions"], src[1]["label"]
    (('a dog', 'a puppy'), 5)
    """

    def __init__(self, images, captions: Sequence, **extras):
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 3:
            raise UserError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
        n = images.shape[0]
        if len(captions) != n:
            raise UserError(f"captions has {len(captions)} entries but images has {n}; give one (or a list) per image.")
        self.images = images
        self.captions = [_as_captions(c) for c in captions]
        self.extras = {}
        for name, values in extras.items():
            values = np.asarray(values)
            if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
                raise UserError(f"extra {name!r} must be int [{n}], got {values.dtype} {values.shape}.")
            self.extras[name] = values.astype(np.int32)
        self.corrupt: set[int] = {i for i, c in enumerate(self.captions) if not c}

    def __len__(self) -> int:
        return self.images.shape[0]

    def _read(self, i: int) -> dict:
        if not self.captions[i]:
            raise UserError("no caption")
        return {"image": self.images[i], "captions": self.captions[i], **{k: int(v[i]) for k, v in self.extras.items()}}

    def all_captions(self) -> list[str]:
        """Every caption (for building a vocabulary)."""
        return [c for cs in self.captions for c in cs]


def _read_caption_file(path: str) -> list[tuple[str, tuple[str, ...]]]:
    """``[(relative image path, captions)]`` from a JSON-lines or CSV file."""
    rows = []
    image_keys, caption_keys = ("image", "file", "file_name", "filename", "path"), ("caption", "captions", "text")

    def pick(record, keys, line):
        for k in keys:
            if k in record and record[k] not in (None, ""):
                return record[k]
        raise UserError(f"{path}:{line}: needs one of the fields {keys}, got {sorted(record)}")

    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for line, text in enumerate(f, 1):
                if text.strip():
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{line}: not valid JSON ({e})") from e
                    rows.append((str(pick(record, image_keys, line)), _as_captions(pick(record, caption_keys, line))))
        elif path.endswith((".csv", ".tsv")):
            reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            for line, record in enumerate(reader, 2):
                rows.append((str(pick(record, image_keys, line)), _as_captions(pick(record, caption_keys, line))))
        else:
            raise UserError(f"captions file {path!r} must end in .jsonl, .json (JSON lines), .csv or .tsv")
    return rows


class FolderImageText(_SkipsCorrupt):
    """Images in a folder, captions in a JSON-lines or CSV file.

    Each JSON line is ``{"image": "relative/path.jpg", "caption": "..."}`` (``"captions": [...]`` for several);
    a CSV has the columns ``image`` and ``caption``. Rows with the same image are merged (several captions).
    Missing or undecodable images are skipped and counted (see the module docstring).

    Args:
      root: the folder the image paths are relative to.
      captions_file: path of the captions file (default ``root/captions.jsonl``, else ``root/captions.csv``).
      image_size: images are resized and centre-cropped to ``image_size x image_size``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> Image.new("RGB", (12, 8), (255, 0, 0)).save(os.path.join(d, "red.png"))
    >>> _ = open(os.path.join(d, "captions.jsonl"), "w").write('{"image": "red.png", "caption": "red"}\\n')
    >>> src = FolderImageText(d, image_size=4)
    >>> src[0]["image"].shape, src[0]["captions"]
    ((4, 4, 3), ('red',))
    """

    def __init__(self, root: str, captions_file: str | None = None, image_size: int = 224):
        if not os.path.isdir(root):
            raise UserError(f"config.data.data_dir={root!r} is not a directory of images.")
        if captions_file is None:
            for name in ("captions.jsonl", "captions.csv"):
                if os.path.exists(os.path.join(root, name)):
                    captions_file = os.path.join(root, name)
                    break
            else:
                raise UserError(f"{root!r} has no captions.jsonl or captions.csv; pass captions_file.")
        elif not os.path.isabs(captions_file) and not os.path.exists(captions_file):
            captions_file = os.path.join(root, captions_file)
        if not os.path.isfile(captions_file):
            raise UserError(f"captions file {captions_file!r} does not exist.")
        merged: dict[str, list[str]] = {}
        for image, caps in _read_caption_file(captions_file):
            merged.setdefault(image, []).extend(caps)
        if not merged:
            raise UserError(f"captions file {captions_file!r} lists no images.")
        self.root, self.image_size = root, int(image_size)
        self.files = list(merged)
        self.captions = [tuple(c) for c in merged.values()]
        self.corrupt: set[int] = {i for i, c in enumerate(self.captions) if not c}

    def __len__(self) -> int:
        return len(self.files)

    def _describe(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def _read(self, i: int) -> dict:
        if not self.captions[i]:
            raise UserError("no caption")
        return {
            "image": decode_image(os.path.join(self.root, self.files[i]), self.image_size),
            "captions": self.captions[i],
        }

    def all_captions(self) -> list[str]:
        """Every caption (for building a vocabulary)."""
        return [c for cs in self.captions for c in cs]


def _prepared_copy(tfds, name: str, data_dir: str | None):
    """A builder for ``data_dir/name[/config]/version`` read from its ``dataset_info.json``, or ``None``.

    ``data_dir`` may be a URI (``gs://bucket/tensorflow_datasets``): it is read through ``etils.epath``.
    """
    from etils import epath

    base = data_dir or os.path.join("~", "tensorflow_datasets")
    root = epath.Path(base if "://" in base else os.path.expanduser(base)) / name
    if not root.is_dir():
        return None
    found = [(os.fspath(d), files) for d, _, files in root.walk()]
    for dirpath, files in sorted(found, reverse=True):  # the highest version first
        if "dataset_info.json" in files and ".incomplete" not in dirpath and "incomplete." not in dirpath:
            try:
                return tfds.builder_from_directory(dirpath)
            except Exception:  # an unreadable copy: fall back to the registered builder
                return None
    return None


def _lookup(record, key: str):
    for part in key.split("/"):
        if isinstance(record, dict) and part in record:
            record = record[part]
        else:
            raise KeyError(
                f"no field {key!r} in the record (fields: {sorted(record) if isinstance(record, dict) else type(record)})"
            )
    return record


class TFDSImageText(_SkipsCorrupt):
    """A prepared TFDS image-text dataset read with ``as_data_source`` (ArrayRecord; no TensorFlow needed).

    Args:
      name: the TFDS name (e.g. ``"coco_captions"``).
      split: e.g. ``"train"``, ``"val"``.
      data_dir: TFDS data directory (default: TFDS's).
      image_key: the image feature (decoded array or encoded bytes).
      caption_key: the caption feature; ``"/"`` walks nested features (``coco_captions``: ``"captions/text"``).
      image_size: images are resized and centre-cropped to this side.

    Raises:
      FileNotFoundError: if the dataset is not prepared (with the command that prepares it).
      ValueError: unknown split or missing features.

    Reading needs a prepared copy; without one the error says how to prepare it:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     try:
    ...         TFDSImageText("no_such_dataset", "train", data_dir=d)
    ...     except FileNotFoundError as e:
    ...         print("tfds build no_such_dataset --file_format=array_record" in str(e))
    True
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "captions/text",
        image_size: int = 224,
    ):
        import tensorflow_datasets as tfds

        builder = _prepared_copy(tfds, name, data_dir)  # reads dataset_info.json: no builder code, no TensorFlow
        if builder is None:
            try:
                builder = tfds.builder(name, data_dir=data_dir or None)
            except Exception as e:  # DatasetNotFoundError, or builder code that imports TensorFlow
                raise FileNotFoundError(
                    f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS data_dir'} and its "
                    f"builder cannot be loaded here ({type(e).__name__}: {str(e)[:200]}); prepare it with "
                    f"`tfds build {name} --file_format=array_record` (needs network and TensorFlow) and pass "
                    "config.data.data_dir"
                ) from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: prepare it with "
                f"`tfds build {name} --file_format=array_record` (needs network) or pass config.data.data_dir"
            )
        if split not in builder.info.splits:
            raise UserError(f"TFDS dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}")
        features = builder.info.features
        if image_key.split("/")[0] not in features or caption_key.split("/")[0] not in features:
            raise UserError(
                f"TFDS dataset {name!r} has features {list(features)}; config.data.image_key={image_key!r} and "
                f"config.data.caption_key={caption_key!r} must name them"
            )
        self.source = builder.as_data_source(split=split)
        self.image_key, self.caption_key, self.image_size = image_key, caption_key, int(image_size)
        self.corrupt: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, i: int) -> dict:
        try:
            record = self.source[i]
        except Exception as e:  # a record whose image fails to decode inside TFDS
            raise UserError(f"record {i} cannot be read: {type(e).__name__}: {e}") from e
        captions = _as_captions(_lookup(record, self.caption_key))
        if not captions:
            raise UserError("no caption")
        return {"image": decode_image(_lookup(record, self.image_key), self.image_size), "captions": captions}

    def all_captions(self, limit: int | None = None) -> list[str]:
        """Captions of the first ``limit`` readable records (for building a vocabulary; decodes their images)."""
        n = len(self) if limit is None else min(int(limit), len(self))
        out = []
        for i in range(n):
            try:
                out.extend(self._read(i)["captions"])
            except (OSError, ValueError, KeyError, SyntaxError):
                self.corrupt.add(i)
        return out


def _collate(records: list[dict], captions: list[str]) -> dict:
    return {**stack_records(records, exclude=("captions",)), "caption": captions}


def train_batches(
    source,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    groups=None,
    groups_per_batch: int = 0,
    subgroups=None,
    subgroups_per_group: int = 1,
) -> Iterator[dict]:
    """This host's training batches from ``start_step``: ``{"image": uint8 [b, H, W, 3], "caption": [b] str, ...}``.

    ``batch_size`` is the global batch; each of ``process_count`` hosts reads ``batch_size // process_count``
    examples of its own ``1 / process_count`` share (``jax.process_index()`` / ``jax.process_count()`` by default).
    Integer extras of the source come as ``int32 [b]`` arrays. The batch of step ``s`` depends only on ``(seed, s)``.

    By default batches walk through epochs of a shuffled order. With ``groups`` (``int [N]``, a group id per
    example) and ``groups_per_batch=G``, each host batch is instead ``G`` groups drawn at random (without
    replacement), ``b / G`` examples from each (without replacement when the group is large enough): grouped
    batches of *hard negatives*, e.g. captions that differ in one word only, so that the contrastive loss must
    tell those apart. With ``subgroups`` (``int [N]``) as well, each drawn group is split by ``subgroups`` and
    ``subgroups_per_group`` of its subgroups are drawn, ``b / (G * S)`` examples from each. Steps are independent
    draws (no epochs).

    >>> src = ArrayImageText(np.zeros((4, 2, 2, 3), np.uint8), [["a", "b"], "c", "d", "e"])
    >>> sorted(next(train_batches(src, 4, seed=0, process_count=1, process_index=0))["caption"])[1:]
    ['c', 'd', 'e']
    >>> src = ArrayImageText(np.zeros((6, 2, 2, 3), np.uint8), list("abcdef"))
    >>> batch = next(train_batches(src, 2, 0, process_count=1, process_index=0, groups=[0, 0, 0, 1, 1, 1],
    ...                            groups_per_batch=1))
    >>> sorted(batch["caption"]) in (["a", "b"], ["a", "c"], ["b", "c"], ["d", "e"], ["d", "f"], ["e", "f"])
    True
    """
    share = HostShare(len(source), batch_size, process_index, process_count)
    order = None
    if groups_per_batch and len(share):
        order = _GroupedOrder(
            share.indices,
            len(source),
            share.local_batch,
            seed,
            groups,
            groups_per_batch,
            subgroups,
            subgroups_per_group,
        )
    for step, indices in share.train_indices(seed, start_step, order):
        records = [source[i] for i in indices]
        rng = np.random.default_rng([int(seed) % 2**32, step])
        captions = [r["captions"][int(rng.integers(len(r["captions"])))] for r in records]
        yield _collate(records, captions)


class _GroupedOrder:
    """``order[step * b + j]``: example ``j`` of the grouped batch of ``step`` (see :func:`train_batches`)."""

    def __init__(
        self,
        indices: np.ndarray,
        n: int,
        local: int,
        seed: int,
        groups,
        groups_per_batch: int,
        subgroups=None,
        subgroups_per_group: int = 1,
    ):
        keys = [("groups", groups, groups_per_batch)]
        if subgroups is not None:
            keys.append(("subgroups", subgroups, subgroups_per_group))
        self.tree, total = indices, 1
        for level, (name, values, g) in enumerate(keys):
            values = np.asarray(values)
            if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer):
                raise UserError(f"{name} must be int [{n}] (one id per example), got {values.dtype} {values.shape}.")
            fewest = self._fewest(self.tree, level, values)
            if not isinstance(g, (int, np.integer)) or not 1 <= g <= fewest or local % (total * g):
                per = "group" if level else "batch"
                raise UserError(
                    f"{name}_per_{per}={g!r} must be an int in [1, {fewest}] (the {name} available per {per}) such "
                    f"that the per-host batch {local} divides into whole groups; pick smaller or dividing values."
                )
            total *= int(g)
            self.tree = self._split(self.tree, values)
        self.counts = [int(g) for _, _, g in keys]
        self.per, self.local, self.seed = local // total, local, int(seed) % 2**32
        self._step, self._batch = None, None

    @classmethod
    def _split(cls, node, values):
        """Leaves (index arrays) split by ``values`` into lists of index arrays, one level deeper."""
        if isinstance(node, list):
            return [cls._split(child, values) for child in node]
        ids, inverse = np.unique(values[node], return_inverse=True)
        return [node[inverse == k] for k in range(len(ids))]

    @classmethod
    def _fewest(cls, node, level, values):
        """The fewest distinct ``values`` in any node at ``level`` (what can be drawn without replacement)."""
        if level:
            return min(cls._fewest(child, level - 1, values) for child in node)
        return len(np.unique(values[node]))

    def _draw(self, rng, node, level):
        if level == len(self.counts):
            return [node[rng.choice(len(node), self.per, replace=len(node) < self.per)]]
        out = []
        for k in rng.choice(len(node), self.counts[level], replace=False):
            out += self._draw(rng, node[k], level + 1)
        return out

    def __getitem__(self, position: int) -> int:
        step, j = divmod(int(position), self.local)
        if step != self._step:
            rng = np.random.default_rng([self.seed, step, 1])
            self._step, self._batch = step, np.concatenate(self._draw(rng, self.tree, 0))
        return int(self._batch[j])


def eval_batches(
    source, batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> Iterator[dict]:
    """This host's evaluation batches in order, first caption of each example, the last batch zero-padded.

    Adds ``mask`` (``float32 [b]``, 1 = real example); every host yields the same number of batches.

    >>> src = ArrayImageText(np.zeros((3, 2, 2, 3), np.uint8), ["a", "b", "c"])
    >>> [(b["caption"], b["mask"].tolist()) for b in eval_batches(src, 2)]
    [(['a', 'b'], [1.0, 1.0]), (['c', ''], [1.0, 0.0])]
    """
    share = HostShare(len(source), batch_size, process_index, process_count, name="config.eval_batch_size")
    first = source[0]
    pad = {
        "image": np.zeros_like(first["image"]),
        "captions": ("",),
        **{k: 0 for k in first if k not in ("image", "captions")},
    }
    for records, mask in padded_eval_batches(source, share, pad):
        yield {**_collate(records, [r["captions"][0] for r in records]), "mask": mask}


def fashion_mnist_captions(
    split: str,
    num_examples: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    data_dir: str | None = None,
    source=None,
    layout: str = "canvas",
) -> ArrayImageText:
    """A split of :func:`mmjax.data.captions.make_captions` as a source with the attribute labels as extras.

    Extras: ``item``, ``colour``, ``size``, ``position`` (indices into the names of :mod:`mmjax.data.captions`).

    >>> src = fashion_mnist_captions("train", 2, source=(np.full((3, 28, 28), 255, np.uint8), np.array([0, 1, 7])))
    >>> len(src), sorted(k for k in src[0] if k not in ("image", "captions"))
    (2, ['colour', 'item', 'position', 'size'])
    """
    from mmjax.data.captions import make_captions

    data = make_captions(
        split, num_examples, seed, image_size=image_size, data_dir=data_dir or None, source=source, layout=layout
    )
    return ArrayImageText(
        data.images, data.captions, item=data.item, colour=data.colour, size=data.size, position=data.position
    )
