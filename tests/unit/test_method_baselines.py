"""The baselines in the same code: P>M>F (dense meta-tuning) trains, the pre-trained ProtoNet is a pure
function of its input, and the functional backbone equals the timm module it wraps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.method.protonet import cosine_logits, prototypes
from smat_dist.train.step import NonFiniteLoss, dense_step

VIT = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                  kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})




@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    from tests.data_fixture import make_dataset

    src = str(make_dataset(tmp_path_factory.mktemp("base"), "toy", images=10))
    stream = EpisodeStream(src, "train", EpisodeConfig(mode="fixed", ways=4, shots=2, queries=3, image_size=32),
                           seed=0)
    eps = [stream.episode(i) for i in range(4)]
    stream.close()
    return eps


def _ce(method, eps) -> float:
    return sum(float(F.cross_entropy(method.predict(ep), ep.query_labels)) for ep in eps) / len(eps)


def test_pmf_dense_step_decreases_loss(episodes):
    cfg = MethodConfig(name="pmf", warmup_tasks=0, total_tasks=10_000, pmf_lr=0.05)
    s = build_local(VIT, cfg, seed=0)
    before = _ce(s.method, episodes)
    for step in range(15):
        out = dense_step(s.method, s.hyper, [episodes[(2 * step) % 4], episodes[(2 * step + 1) % 4]],
                         2 * step, 2 * step)
        assert set(out) >= {"loss/query_ce", "acc/query", "lr_factor"}
    after = _ce(s.method, episodes)
    assert after < 0.9 * before, (before, after)
    assert float(s.method.delta.detach().abs().sum()) > 0
    # the backbone itself is untouched: P>M>F's weights are theta_pre + delta
    assert all(not p.requires_grad for p in s.fb.model.parameters())


def test_pmf_at_init_is_the_pretrained_protonet(episodes):
    pmf = build_local(VIT, MethodConfig(name="pmf"), seed=0)
    pre = build_local(VIT, MethodConfig(name="pretrained"), seed=0, fb=pmf.fb)
    for ep in episodes[:2]:
        assert torch.allclose(pmf.method.predict(ep), pre.method.predict(ep), atol=1e-5)


def test_pretrained_predict_is_deterministic_and_a_cosine_protonet(episodes):
    s = build_local(VIT, MethodConfig(name="pretrained"), seed=0)
    assert s.pool is None and s.hyper is None
    ep = episodes[0]
    a, b = s.method.predict(ep), s.method.predict(ep)
    assert torch.equal(a, b)
    # by hand, through the timm module's own forward (not the functional call)
    with torch.no_grad():
        fs, fq = s.fb.model(ep.support), s.fb.model(ep.query)
    protos = torch.stack([fs[ep.support_labels == c].mean(0) for c in range(ep.ways)])
    hand = 10.0 * F.normalize(fq, dim=-1) @ F.normalize(protos, dim=-1).t()
    assert torch.allclose(a, hand, atol=1e-5)
    assert torch.allclose(cosine_logits(fq, prototypes(fs, ep.support_labels, ep.ways)), hand, atol=1e-5)


def test_pmf_nan_raises(episodes):
    s = build_local(VIT, MethodConfig(name="pmf"), seed=0)
    with torch.no_grad():
        s.method.delta[0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="task 9"):
        dense_step(s.method, s.hyper, [episodes[0]], 9, 9)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method.name='maml'"):
        build_local(VIT, MethodConfig(name="maml"))
