"""CLIP image preprocessing with NumPy and PIL, as Hugging Face ``CLIPImageProcessor`` does it.

For each image: convert to RGB; resize so the shorter side is ``size`` (the longer side becomes
``int(size * long / short)``) with PIL bicubic resampling on the 8-bit image; center crop ``crop_size``
(offset ``(H - crop) // 2``); scale by 1/255; normalise with OpenAI's per-channel mean and std::

    x = (pixel / 255 - mean) / std

The result is NHWC float32, the layout :class:`mmjax.clip.CLIP` takes (Hugging Face returns NCHW).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "resize_shortest_side",
    "center_crop",
    "preprocess_image",
    "preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4] in 0..255, got dtype {arr.dtype} and shape "
            f"{arr.shape}; convert with (x * 255).round().astype(np.uint8) or pass a PIL image."
        )
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr).convert("RGB")
    raise ValueError(f"image arrays must be HWC with 1, 3 or 4 channels or HW, got shape {arr.shape}.")


def resize_shortest_side(image: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``size``; the longer becomes ``int(size * long / short)`` (HF/torchvision).

    >>> resize_shortest_side(Image.new("RGB", (640, 480)), 224).size
    (298, 224)
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}.")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), resample=_RESAMPLE[resample])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Crop the central ``size x size`` window of an HWC array (top/left offset ``(H - size) // 2``).

    >>> center_crop(np.arange(25).reshape(5, 5, 1), 3)[..., 0].tolist()
    [[6, 7, 8], [11, 12, 13], [16, 17, 18]]
    """
    h, w = image.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the image {h}x{w}; resize to at least {size} first.")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def preprocess_image(
    image: Any,
    size: int = 224,
    crop_size: int | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: str = "bicubic",
) -> np.ndarray:
    """One image (PIL image, uint8 array or file path) -> normalised ``[crop_size, crop_size, 3]`` float32.

    Args:
      image: a PIL image, a uint8 array ``[H, W]``/``[H, W, C]`` or a path.
      size: the shorter side after resizing.
      crop_size: the center crop (default ``size``).
      mean, std: per-channel statistics of the 0..1 pixels (OpenAI's by default).
      resample: PIL filter (``"bicubic"``).

    >>> x = preprocess_image(np.full((40, 60, 3), 255, np.uint8), size=16)
    >>> x.shape, x.dtype, bool(np.allclose(x[0, 0], (1 - np.array(OPENAI_CLIP_MEAN)) / OPENAI_CLIP_STD))
    ((16, 16, 3), dtype('float32'), True)
    """
    crop_size = size if crop_size is None else crop_size
    pil = resize_shortest_side(_to_pil(image), size, resample)
    arr = center_crop(np.asarray(pil), crop_size)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((arr.astype(np.float32) * np.float32(1 / 255) - mean) / std).astype(np.float32)


def preprocess(images: Any, **kwargs) -> np.ndarray:
    """A batch (or one image) -> NHWC float32 ``[N, crop_size, crop_size, 3]``; see :func:`preprocess_image`.

    >>> preprocess([np.zeros((20, 30, 3), np.uint8)] * 2, size=8).shape
    (2, 8, 8, 3)
    """
    if isinstance(images, (Image.Image, str, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)
    ):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("images is empty; pass at least one image.")
    return np.stack([preprocess_image(im, **kwargs) for im in images])
