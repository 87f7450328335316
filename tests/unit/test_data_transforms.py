"""Train/eval transforms: shapes, normalisation, and determinism from an explicit generator only."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from smat_dist.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_resize, eval_transform, normalize_batch,
                                       random_resized_crop_params, train_transform)


def photo(w=84, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_random_resized_crop_params_in_bounds():
    g = np.random.default_rng(0)
    for w, h in [(84, 84), (200, 50), (50, 200), (7, 3)]:
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_params(w, h, g)
            assert 0 < ch <= h and 0 < cw <= w and 0 <= top <= h - ch and 0 <= left <= w - cw
            assert ch * cw <= w * h


def test_train_transform_deterministic_and_ignores_global_rng():
    img = photo()
    torch.manual_seed(0)
    a = train_transform(img, 32, np.random.default_rng(5))
    torch.manual_seed(123)
    np.random.seed(9)
    b = train_transform(img, 32, np.random.default_rng(5))
    c = train_transform(img, 32, np.random.default_rng(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_eval_transform_is_resize_then_center_crop():
    img = photo(100, 60)
    out = eval_transform(img, 128)
    assert eval_resize(128) == 146 and out.shape == (128, 128, 3)
    ref = TF.center_crop(TF.resize(img, 146), [128, 128])
    assert np.array_equal(out, np.asarray(ref))


def test_normalize_batch_matches_torchvision():
    imgs = [np.asarray(photo(16, 16, s)) for s in range(3)]
    got = normalize_batch(imgs, 16)
    ref = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(i)), IMAGENET_MEAN, IMAGENET_STD) for i in imgs])
    assert got.shape == (3, 3, 16, 16) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)
    assert normalize_batch([], 16).shape == (0, 3, 16, 16)
