"""Image-text sources (arrays, folder + JSONL/CSV, TFDS ArrayRecord), corrupt images skipped and counted, batching
that depends only on (seed, step), disjoint per-host shards, padded evaluation batches."""

import io
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax.data.image_text import (
    ArrayImageText,
    FolderImageText,
    TFDSImageText,
    decode_image,
    eval_batches,
    fashion_mnist_captions,
    train_batches,
)
from tests.test_data import batch_digest


def _array_source(n=12, size=4):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)
    captions = [[f"image {i}", f"picture {i}"] if i % 2 else f"image {i}" for i in range(n)]
    return ArrayImageText(images, captions, label=np.arange(n) % 3)


def test_array_source_and_validation():
    src = _array_source()
    assert len(src) == 12 and src[3]["captions"] == ("image 3", "picture 3") and src[3]["label"] == 0
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\], got float32"):
        ArrayImageText(np.zeros((2, 4, 4, 3), np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="captions has 1 entries but images has 2"):
        ArrayImageText(np.zeros((2, 4, 4, 3), np.uint8), ["a"])
    with pytest.raises(ValueError, match=r"extra 'label' must be int \[2\]"):
        ArrayImageText(np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"], label=[0.5, 1.0])
    empty_caption = ArrayImageText(np.zeros((3, 2, 2, 3), np.uint8), ["a", "", "c"])
    assert empty_caption[1]["captions"] == ("c",) and empty_caption.num_corrupt == 1  # skipped and counted


def test_train_batches_depend_only_on_seed_and_step():
    src = _array_source()
    a = train_batches(src, 4, seed=7, process_index=0, process_count=1)
    first = [next(a) for _ in range(6)]
    resumed = next(train_batches(src, 4, seed=7, start_step=4, process_index=0, process_count=1))
    np.testing.assert_array_equal(resumed["image"], first[4]["image"])
    assert resumed["caption"] == first[4]["caption"]
    # one epoch (3 steps of 4) visits every example once; the next epoch is reshuffled
    epoch = np.concatenate([b["image"][:, 0, 0, 0] for b in first[:3]])
    assert sorted(epoch.tolist()) == list(range(12))
    assert not np.array_equal(epoch, np.concatenate([b["image"][:, 0, 0, 0] for b in first[3:6]]))
    # the caption is one of the example's captions
    for b in first:
        for idx, cap in zip(b["image"][:, 0, 0, 0], b["caption"]):
            assert cap in src[int(idx)]["captions"]
        assert b["label"].dtype == np.int32 and b["label"].tolist() == (b["image"][:, 0, 0, 0] % 3).tolist()
    other_seed = next(train_batches(src, 4, seed=8, process_index=0, process_count=1))
    assert not np.array_equal(other_seed["image"], first[0]["image"])
    with pytest.raises(ValueError, match="not divisible by the number of hosts"):
        next(train_batches(src, 5, seed=0, process_index=0, process_count=2))


def test_grouped_batches_draw_whole_groups_and_resume_exactly():
    src = _array_source(n=24)
    groups = np.arange(24) % 6  # 6 groups of 4; the image value is the example index
    kw = dict(groups=groups, groups_per_batch=2, process_index=0, process_count=1)
    run = train_batches(src, 4, seed=3, **kw)
    first = [next(run) for _ in range(8)]
    for b in first:  # 2 groups x 2 distinct examples each
        idx = b["image"][:, 0, 0, 0].astype(int)
        assert len(set(groups[idx[:2]].tolist())) == 1 and len(set(groups[idx[2:]].tolist())) == 1
        assert groups[idx[0]] != groups[idx[2]] and len(set(idx.tolist())) == 4
    resumed = next(train_batches(src, 4, seed=3, start_step=5, **kw))
    np.testing.assert_array_equal(resumed["image"], first[5]["image"])
    assert len({tuple(b["image"][:, 0, 0, 0].tolist()) for b in first}) > 1
    # a host draws only from its own share
    host1 = train_batches(src, 4, seed=3, groups=groups, groups_per_batch=2, process_index=1, process_count=2)
    assert all(i % 2 == 1 for _ in range(4) for i in next(host1)["image"][:, 0, 0, 0].tolist())
    with pytest.raises(ValueError, match=r"groups_per_batch=3 must be an int in \[1, 6\].*per-host batch 4 divides"):
        next(train_batches(src, 4, seed=0, groups=groups, groups_per_batch=3, process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"groups_per_batch=7"):
        next(train_batches(src, 7, seed=0, groups=groups, groups_per_batch=7, process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"groups must be int \[24\]"):
        next(train_batches(src, 4, seed=0, groups=groups[:5], groups_per_batch=2, process_index=0, process_count=1))
    # subgroups: 2 groups x 2 subgroups x 1 example; groups of 4 examples split into 2 subgroups of 2
    sub = (np.arange(24) // 6) % 2
    kw = dict(groups=groups, groups_per_batch=2, subgroups=sub, subgroups_per_group=2, process_index=0, process_count=1)
    for b in [next(train_batches(src, 4, seed=s, **kw)) for s in range(5)]:
        idx = b["image"][:, 0, 0, 0].astype(int)
        assert groups[idx[0]] == groups[idx[1]] != groups[idx[2]] == groups[idx[3]]
        assert sub[idx[0]] != sub[idx[1]] and sub[idx[2]] != sub[idx[3]]
    with pytest.raises(ValueError, match=r"subgroups_per_group=3 must be an int in \[1, 2\]"):
        next(train_batches(src, 12, seed=0, **{**kw, "subgroups_per_group": 3}))


def test_per_host_shards_are_disjoint_and_complete():
    src = _array_source()
    seen = []
    for host in range(2):
        batches = train_batches(src, 4, seed=1, process_index=host, process_count=2)
        seen.append(np.concatenate([next(batches)["image"][:, 0, 0, 0] for _ in range(3)]))  # 3 x 2 = one share
        assert len(seen[-1]) == 6 and len(set(seen[-1].tolist())) == 6
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(np.concatenate(seen).tolist()) == list(range(12))


# Digests computed before the image and image-text pipelines shared one host-sharding code path (issue 16); the
# grouped kinds are the CLIP job's hard-negative batches.
PINNED_DIGESTS = {
    (1, 0, "shuffled"): "8f5a1f335d9f38be",
    (1, 0, "groups"): "2f3bf100342c8086",
    (1, 0, "subgroups"): "d6c6002f6cf8a7e8",
    (1, 0, "eval"): "68f35e5c54538528",
    (2, 0, "shuffled"): "75a81ec96804f4ef",
    (2, 0, "groups"): "3b9a63debe3d42f5",
    (2, 0, "subgroups"): "1230388c0ceb51b3",
    (2, 0, "eval"): "35fffaebeb4e9550",
    (2, 1, "shuffled"): "3f33c4adb405ffde",
    (2, 1, "groups"): "b7cc359aea43472e",
    (2, 1, "subgroups"): "8d678e6c86f32eb7",
    (2, 1, "eval"): "4f5c2c85fe70aa37",
}


@pytest.mark.parametrize("count, index, kind", list(PINNED_DIGESTS))
def test_batches_are_bit_identical_to_the_pinned_order(count, index, kind):
    n = 13
    rng = np.random.default_rng(0)
    rng.integers(0, 256, (11, 5, 5, 1), dtype=np.uint8)  # the digests were computed after this draw
    images = rng.integers(0, 256, (n, 3, 3, 3), dtype=np.uint8)
    captions = [[f"a {i}", f"b {i}", f"c {i}"] if i % 2 else f"a {i}" for i in range(n)]
    groups, subgroups = np.arange(n) % 2, (np.arange(n) // 2) % 2
    src = ArrayImageText(images, captions, label=np.arange(n) % 3, group=groups)
    hosts = dict(process_index=index, process_count=count)
    if kind == "eval":
        batches = eval_batches(src, 4, **hosts)
    else:
        grouping = {
            "shuffled": {},
            "groups": {"groups": groups, "groups_per_batch": 1},
            "subgroups": {"groups": groups, "groups_per_batch": 1, "subgroups": subgroups, "subgroups_per_group": 2},
        }[kind]
        batches = itertools.islice(train_batches(src, 4, seed=9, start_step=2, **hosts, **grouping), 7)
    assert batch_digest(batches) == PINNED_DIGESTS[count, index, kind]


def test_eval_batches_pad_mask_and_hosts():
    src = _array_source(n=5)
    batches = list(eval_batches(src, 4, process_index=0, process_count=1))
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batches[1]["caption"] == ["image 4", "", "", ""] and batches[1]["image"].shape == (4, 4, 4, 3)
    per_host = [list(eval_batches(src, 4, process_index=h, process_count=2)) for h in range(2)]
    assert len(per_host[0]) == len(per_host[1])  # collectives need the same number of batches everywhere
    real = sorted(int(i) for bs in per_host for b in bs for i, m in zip(b["image"][:, 0, 0, 0], b["mask"]) if m)
    assert real == list(range(5))


def _write_folder(root, fmt="jsonl"):
    os.makedirs(root / "imgs", exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, c in enumerate(colours):
        Image.new("RGB", (10 + 2 * i, 8), c).save(root / "imgs" / f"{i}.png")
    Image.new("L", (8, 8), 128).save(root / "imgs" / "grey.png")
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [
        ("imgs/0.png", "red"),
        ("imgs/broken.png", "broken"),
        ("imgs/1.png", "green"),
        ("imgs/1.png", "lime"),
        ("imgs/missing.png", "gone"),
        ("imgs/2.png", "blue"),
        ("imgs/grey.png", "grey"),
    ]
    if fmt == "jsonl":
        with open(root / "captions.jsonl", "w") as f:
            for image, caption in rows:
                f.write(json.dumps({"image": image, "caption": caption}) + "\n")
    else:
        with open(root / "captions.csv", "w") as f:
            f.write("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_source_skips_and_counts_corrupt_images(tmp_path, fmt):
    _write_folder(tmp_path, fmt)
    src = FolderImageText(str(tmp_path), image_size=6)
    assert len(src) == 6  # rows of the same image merge
    assert src[2]["captions"] == ("green", "lime")
    np.testing.assert_array_equal(src[0]["image"][3, 3], [255, 0, 0])
    assert src[1]["captions"] == ("green", "lime") and src.num_corrupt == 1  # broken.png -> next readable one
    assert src[3]["captions"] == ("blue",) and src.num_corrupt == 2  # missing.png too
    assert src[5]["image"].shape == (6, 6, 3) and src[5]["image"][0, 0].tolist() == [128, 128, 128]  # grey -> RGB
    batches = train_batches(src, 6, seed=0, process_index=0, process_count=1)
    for _ in range(3):  # never crashes, every batch full of readable images
        b = next(batches)
        assert b["image"].shape == (6, 6, 6, 3) and "broken" not in b["caption"] and "gone" not in b["caption"]
    assert src.verify() == 2


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        FolderImageText(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no captions.jsonl or captions.csv"):
        FolderImageText(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):
        FolderImageText(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"picture": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"needs one of the fields \('image'"):
        FolderImageText(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    src = FolderImageText(str(tmp_path), image_size=4)
    with pytest.raises(ValueError, match=r"no readable example.*a.png"):
        src[0]


def _build_tiny_coco(data_dir):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        """coco_captions-like: an image and a sequence of captions; example 2 holds corrupt image bytes."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (12, 9), (10 * i, 0, 0)).save(buf, format="PNG")
                data = buf.getvalue() if i != 2 else buf.getvalue()[:30]  # truncated: fails to decode
                yield i, {"image": data, "captions": [{"text": f"caption {i}"}, {"text": f"other {i}"}]}

    TinyCaptions.__module__ = "tiny_captions_builder"  # see tests/test_data.py: skips an importlib_resources lookup
    builder = TinyCaptions(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_tfds_array_record_image_text(tmp_path):
    _build_tiny_coco(tmp_path)
    src = TFDSImageText("tiny_captions", "train", str(tmp_path), image_size=8)
    assert len(src) == 6
    records = [src[i] for i in range(len(src))]  # TFDS stores the examples in its own (shuffled) order
    numbers = set()
    for record in records:
        k = int(record["captions"][0].split()[1])
        numbers.add(k)
        assert record["captions"] == (f"caption {k}", f"other {k}") and record["image"].shape == (8, 8, 3)
        assert record["image"][4, 4].tolist() == [10 * k, 0, 0]
    assert numbers == {0, 1, 3, 4, 5} and src.num_corrupt == 1  # the corrupt one is skipped and counted
    batch = next(train_batches(src, 6, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (6, 8, 8, 3) and all(c.split()[1] != "2" for c in batch["caption"])
    with pytest.raises(ValueError, match=r"no split 'val'"):
        TFDSImageText("tiny_captions", "val", str(tmp_path))
    with pytest.raises(ValueError, match=r"caption_key='text'"):
        TFDSImageText("tiny_captions", "train", str(tmp_path), caption_key="text")
    with pytest.raises(FileNotFoundError, match="tfds build coco_captions"):
        TFDSImageText("coco_captions", "train", str(tmp_path / "empty"))


def test_decode_image_and_fashion_captions_source():
    assert decode_image(np.zeros((6, 10), np.uint8), 4).shape == (4, 4, 3)
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 5)
    assert out.shape == (5, 5, 3) and out[2, 2].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"got dtype float64 and shape \(2, 2\)"):
        decode_image(np.zeros((2, 2)))
    with pytest.raises(OSError):
        decode_image(b"not an image")
    src = fashion_mnist_captions("train", 4, source=(np.full((3, 28, 28), 255, np.uint8), np.array([0, 1, 7])))
    assert len(src) == 4 and src[0]["image"].shape == (64, 64, 3)
    from mmjax.data.captions import ITEM_NAMES

    for i in range(4):
        assert f" {ITEM_NAMES[src[i]['item']]} in the " in src[i]["captions"][0]
