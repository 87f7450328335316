"""Activation checkpointing of backbone blocks changes memory, never results (SMAT's several backward passes
through the same forward included)."""
import pytest
import torch

from smat_dist.bench.step import synthetic_episode
from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.train.step import dense_step, smat_step


def _train(method: str, checkpoint: bool):
    torch.set_num_threads(1)
    mc = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2}, checkpoint_blocks=checkpoint)
    s = build_local(mc, MethodConfig(name=method, experts=2, delta_lr=1e-2, pmf_lr=1e-2))
    losses = []
    for i in range(3):
        if method == "smat":
            m = smat_step(s.method, s.pool, s.hyper, [synthetic_episode(3, 2, 2, 32, seed=0, index=i)], i, i)
        else:
            m = dense_step(s.method, s.hyper, [synthetic_episode(3, 2, 2, 32, seed=0, index=i)], i, i)
        losses.append(m["loss/task"])
    delta = (s.pool.shard.delta if s.pool is not None else s.method.delta).detach().clone()
    return losses, delta


@pytest.mark.parametrize("method", ["smat", "pmf"])
def test_checkpointed_blocks_train_identically(method):
    plain, ck = _train(method, False), _train(method, True)
    assert plain[0] == ck[0]
    torch.testing.assert_close(plain[1], ck[1], rtol=0, atol=0)
    assert plain[1].abs().max() > 0


def test_model_without_blocks_is_refused():
    from smat_dist.model.backbone import build_backbone

    with pytest.raises(ValueError, match="no 'blocks'"):
        build_backbone(ModelConfig(name="resnet18", image_size=32, patch_size=None, checkpoint_blocks=True))
