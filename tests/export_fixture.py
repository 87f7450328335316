"""The export tests' tiny model and synthetic pool checkpoints (smat_dist.bench.export.save_synthetic: saved by
N gloo ranks without training, the same pool at any world size)."""
from __future__ import annotations

import copy

from smat_dist.bench.export import save_synthetic as save_rank  # noqa: F401 (re-exported for the tests)
from smat_dist.bench.export import synthetic_config
from smat_dist.config.schema import Config, ModelConfig

MODEL = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, kwargs={"depth": 2})


def export_config(experts: int, eval_gate: str = "upstream", method: str = "smat") -> Config:
    return synthetic_config(copy.deepcopy(MODEL), experts, method, eval_gate)
