"""The method's image transforms, driven by an explicit per-episode generator (never the global torch RNG).

Train (P>M>F / SMAT): RandomResizedCrop(size) -> ImageJitter(Brightness 0.4, Contrast 0.4, Color 0.4) ->
RandomHorizontalFlip -> ToTensor -> ImageNet normalisation. ImageJitter is the PIL ImageEnhance jitter of
the CloserLook/P>M>F code: each enhancer in that fixed order with factor 1 + 0.4 * U(-1, 1).
Eval: Resize(size * 146 / 128) on the shorter side -> CenterCrop(size) -> ToTensor -> normalisation.
Random parameters follow torchvision's RandomResizedCrop rules (scale (0.08, 1), ratio (3/4, 4/3),
10 attempts, then a centre crop), drawn from the numpy Generator the caller passes in.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
JITTER_STRENGTH = 0.4


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision.transforms.RandomResizedCrop.get_params decides them."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_uint8(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)  # [H, W, 3]


_MEAN = np.array(IMAGENET_MEAN, np.float32) * 255.0
_INV_STD = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255.0)


def normalize_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack [H, W, 3] uint8 images into one [N, 3, H, W] float32 ImageNet-normalised tensor.

    Done once per episode, in numpy: per-image torch ops on small tensors cost more in dispatch and
    intra-op thread wake-ups (which stall on a busy machine) than in arithmetic."""
    if not images:
        return torch.empty(0, 3, size, size)
    batch = np.stack(images).astype(np.float32)
    batch -= _MEAN
    batch *= _INV_STD
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def train_transform(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented image as a [size, size, 3] uint8 array (normalise with normalize_batch)."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, rng)
    img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR)
    factors = 1.0 + JITTER_STRENGTH * (rng.uniform(size=len(JITTER)) * 2.0 - 1.0)
    for enhancer, f in zip(JITTER, factors):
        img = enhancer(img).enhance(float(f)).convert("RGB")
    if rng.uniform() < 0.5:
        img = TF.hflip(img)
    return _to_uint8(img)


def eval_resize(size: int) -> int:
    return int(size * 146 / 128)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    """One evaluation image as a [size, size, 3] uint8 array (normalise with normalize_batch)."""
    img = TF.resize(img, eval_resize(size), InterpolationMode.BILINEAR)
    img = TF.center_crop(img, [size, size])
    return _to_uint8(img)
