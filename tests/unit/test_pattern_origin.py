"""What a learned mask pattern owes to its initial draw (analysis/pattern_origin.py), on real checkpoints
written by the checkpointer: logits equal to the draw shifted down keep exactly the draw's top entries (share
1); logits drawn independently of it keep the draw's top at chance (share = kept fraction)."""
from __future__ import annotations

import pytest
import torch

from smat_dist.analysis.pattern_origin import init_share
from smat_dist.build import build_local
from smat_dist.checkpoint import Checkpointer
from smat_dist.config.hydra import to_yaml
from smat_dist.config.schema import Config, MethodConfig, ModelConfig, TrainConfig
from smat_dist.distributed.comm import Comm
from smat_dist.pool.draws import chunked_normal
from smat_dist.train.state import RngState, TrainState

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 1, "embed_dim": 64, "num_heads": 2})


def _save(tmp_path, logits_from, structured=False, seed=3, pattern="learned"):
    cfg = Config(model=TINY, method=MethodConfig(name="smat", experts=3), train=TrainConfig(seed=seed))
    cfg.method.sparsity.structured, cfg.method.sparsity.pattern = structured, pattern
    s = build_local(cfg.model, cfg.method, seed=seed)
    la = s.pool.shard.log_alpha
    if logits_from is not None:
        init = chunked_normal(seed, 0, la.shape[0], 3, 0.0, cfg.method.sparsity.init_std)
        assert torch.equal(la.detach()[:s.pool.shard.n_valid], init[:s.pool.shard.n_valid])  # the regenerated draw
        with torch.no_grad():
            la.copy_(logits_from(init))
    ck = Checkpointer(tmp_path / "checkpoints", Comm(), keep=1, async_save=False)
    ck.save(4, {"pool": s.pool, "train": TrainState(tasks=4), "rng": RngState()},
            {"method": "smat", "experts": 3}, texts={"config.yaml": to_yaml(cfg)})
    return s.pool.shard.numel


def test_a_shifted_draw_keeps_the_draws_top_entries(tmp_path):
    numel = _save(tmp_path, lambda init: init - 2.0)      # a uniform push down: the kept set is the draw's top
    o = init_share(tmp_path)
    assert o["experts"] == 3 and numel > 50_000
    # kept: log alpha > -1.599, i.e. init > 0.401: P(N(0, 0.5^2) > 0.401) = 0.211
    assert o["kept"] == pytest.approx([0.211] * 3, abs=0.01)
    assert all(f == pytest.approx(1.0, abs=0.02) for f in o["from_init"]), o


def test_an_independent_pattern_is_at_chance(tmp_path):
    g = torch.Generator().manual_seed(99)
    _save(tmp_path, lambda init: torch.randn(init.shape, generator=g) * 0.5 - 1.0)
    o = init_share(tmp_path)
    for k, f in zip(o["kept"], o["from_init"]):
        assert f == pytest.approx(k, abs=0.02), o


def test_structured_and_hand_designed_pools_are_not_measured(tmp_path):
    _save(tmp_path / "s", None, structured=True)
    assert init_share(tmp_path / "s") is None
    _save(tmp_path / "r", None, pattern="random")
    assert init_share(tmp_path / "r") is None


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        init_share(tmp_path)
