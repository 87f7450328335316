"""SMAT end to end on tiny real backbones and real image episodes: gradients, parameter count, state_dict
round trip, label-permutation invariance, non-finite losses, and that a ViT and a CNN both train."""
from __future__ import annotations

import io

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.data.episodes import Episode, EpisodeConfig, EpisodeStream
from smat_dist.build import build_local
from smat_dist.pool import gates as hc
from smat_dist.train.step import NonFiniteLoss, smat_step
from tests.data_fixture import make_dataset

VIT = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                  kwargs={"depth": 2, "embed_dim": 64, "num_heads": 4})
SMALL_VIT = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8,
                        kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
CNN = ModelConfig(name="efficientnet_lite0", image_size=32, patch_size=None, pretrained="package:efficientnet_lite0")




def _ident(t):
    return t


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("smat")
    src = str(make_dataset(root, "toy", images=10))
    stream = EpisodeStream(src, "train", EpisodeConfig(mode="fixed", ways=4, shots=2, queries=3, image_size=32),
                           seed=0, train_aug=False)
    eps = [stream.episode(i) for i in range(6)]
    stream.close()
    return eps


def _cfg(**kw) -> MethodConfig:
    cfg = MethodConfig(experts=4, warmup_tasks=0, total_tasks=10_000)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _permuted(ep: Episode, perm: torch.Tensor) -> Episode:
    """The same task with class j renamed perm[j] (images unchanged)."""
    names = [None] * ep.ways
    for j, n in enumerate(ep.class_names):
        names[int(perm[j])] = n
    return Episode(ep.support, perm[ep.support_labels], ep.query, perm[ep.query_labels], ep.source, ep.split,
                   ep.index, ep.ways, names)


def _capture_grads(opt: torch.optim.Optimizer, store: dict) -> None:
    """Record each parameter's gradient as the optimiser is about to step (after clipping)."""
    def hook(o, args, kwargs):
        for g in o.param_groups:
            for i, p in enumerate(g["params"]):
                store[f"{g.get('name', 'group')}.{i}"] = None if p.grad is None else p.grad.detach().clone()
    opt.register_step_pre_hook(hook)


def _step(s, eps, first=0):
    return smat_step(s.method, s.pool, s.hyper, eps, first, first)


def test_gradients_reach_delta_masks_and_hypernetwork(episodes):
    cfg = _cfg()
    cfg.hypernet.logit_reg = 0.0  # so any hypernetwork gradient comes through the merged weights
    s = build_local(SMALL_VIT, cfg, seed=0)
    with torch.no_grad():
        s.pool.shard.delta.normal_(0, 1e-2)  # log_alpha and the hypernetwork only see the task once delta != 0
    pool_g, hyper_g = {}, {}
    _capture_grads(s.pool.optimizer.opt, pool_g)
    _capture_grads(s.hyper.opt, hyper_g)
    assert float(s.pool.controller.multipliers.abs().sum()) == 0.0  # no sparsity gradient in this step
    with torch.no_grad():
        s.pool.shard.log_alpha.mul_(4.0)  # spread the logits so that some lie beyond the train threshold
    la = s.pool.shard.log_alpha.detach().clamp(-cfg.sparsity.clamp, cfg.sparsity.clamp).clone()
    _step(s, episodes[:2])
    assert pool_g["delta.0"].abs().sum() > 0
    g_la = pool_g["log_alpha.0"]
    assert g_la.abs().sum() > 0
    # the gate's hardtanh: entries beyond the train threshold are exactly 0/1 and get no task gradient
    beyond = la.abs() > hc.threshold(train=True) + 1e-3
    assert 0 < int(beyond.sum()) < beyond.numel()
    assert float(g_la[beyond].abs().sum()) == 0.0 and float(g_la[~beyond].abs().sum()) > 0
    hyper_params = dict(s.method.hypernet.named_parameters())
    names = list(hyper_params)
    for i, name in enumerate(names):
        assert hyper_g[f"hypernet.{i}"] is not None, name
    for key in ("tokens", "keys"):
        i = names.index(key)
        assert hyper_g[f"hypernet.{i}"].abs().sum() > 0, key
    block = [hyper_g[f"hypernet.{i}"] for i, n in enumerate(names) if n.startswith("block.")]
    assert all(g.abs().sum() > 0 for g in block)


def test_sparsity_penalty_gradient_alone_matches_hand_formula(episodes):
    """delta == 0: no task gradient reaches the masks; lambda > 0: the penalty's gradient is
    lambda_m * w_m * sigmoid'(log_alpha + 1.5986) / N per entry, exactly."""
    cfg = _cfg()
    cfg.hypernet.logit_reg = 0.0
    s = build_local(SMALL_VIT, cfg, seed=0)
    pool_g, hyper_g = {}, {}
    _capture_grads(s.pool.optimizer.opt, pool_g)
    _capture_grads(s.hyper.opt, hyper_g)
    out = _step(s, episodes[:1])
    assert float(pool_g["log_alpha.0"].abs().sum()) == 0.0  # lambda 0 and delta 0: nothing moves the masks
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in hyper_g.values())  # w has no effect yet
    assert pool_g["delta.0"].abs().sum() > 0
    # now with multipliers, delta still 0
    with torch.no_grad():
        s.pool.shard.delta.zero_()
    lam = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    s.pool.controller.multipliers.copy_(lam)
    la0 = s.pool.shard.log_alpha.detach().clone().clamp(-cfg.sparsity.clamp, cfg.sparsity.clamp)
    out = _step(s, episodes[1:2], first=1)
    w = torch.tensor([out[f"w_mean/expert{m}"] for m in range(4)], dtype=torch.float64)
    p = torch.sigmoid(la0.double() + hc.L0_SHIFT)
    expect = (p * (1 - p) * (lam * w) / s.pool.shard.numel).float()
    assert out["grad_norm/log_alpha"] < cfg.sparsity.mask_clip  # not clipped, so comparable as is
    assert torch.allclose(pool_g["log_alpha.0"], expect, rtol=1e-4, atol=1e-12)
    assert float(pool_g["log_alpha.0"][:, 3].abs().sum()) == 0.0  # lambda_3 == 0


def test_trainable_count(episodes):
    M = 4
    s = build_local(SMALL_VIT, _cfg(experts=M), seed=0)
    numel = sum(p.numel() for p in s.fb.model.parameters())
    assert s.fb.space.numel == numel and all(not p.requires_grad for p in s.fb.model.parameters())
    d = s.fb.feature_dim
    # tokens 4d, keys Md, LN 2x2d, qkv 3d^2 (no bias), proj d^2+d, fc1 2d^2+2d, fc2 2d^2+d
    hyper = 4 * d + M * d + 4 * d + 3 * d * d + d * d + d + 2 * d * d + 2 * d + 2 * d * d + d
    assert sum(p.numel() for p in s.method.hypernet.parameters()) == hyper
    trainable = sum(p.numel() for p in list(s.pool.shard.parameters()) + list(s.method.parameters())
                    if p.requires_grad)
    assert trainable == (M + 1) * numel + hyper
    # the multipliers belong to the pool component: saved with it, not gradient-trained
    assert "multipliers" in s.pool.state_dict()["replicated"]
    assert not any(p is s.pool.controller.multipliers for p in s.method.parameters())


def _state(s) -> dict:
    buf = io.BytesIO()
    torch.save({"method": s.method.state_dict(), "pool": s.pool.state_dict(), "pool_opt": s.pool.optimizer.state_dict(),
                "hyper_opt": s.hyper.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _flat_items(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat_items(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat_items(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def _same(a, b) -> list[str]:
    fa, fb = dict(_flat_items(a)), dict(_flat_items(b))
    bad = sorted(set(fa) ^ set(fb))
    for k in set(fa) & set(fb):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


def test_state_dict_round_trip_restores_everything(episodes):
    cfg = _cfg()
    cfg.sparsity.lambda_lr = 1.0  # multipliers visibly non-zero after a few steps
    a = build_local(SMALL_VIT, cfg, seed=0)
    for i in range(3):
        _step(a, episodes[2 * i:2 * i + 2], first=2 * i)
    sd = _state(a)
    m = sd["method"]
    for key in ("hypernet.tokens", "hypernet.keys", "hypernet.tasks_seen"):
        assert key in m, key
    assert int(m["hypernet.tasks_seen"]) == 6
    assert float(sd["pool"]["replicated"]["multipliers"].abs().sum()) > 0
    assert set(sd["pool"]["tensors"]) == {"delta", "log_alpha", "delta_momentum"}
    assert sd["pool_opt"]["state"] and sd["hyper_opt"]["state"]  # momentum / Adam moments exist
    # A fresh setup (the run seed is configuration, not state: it keys the per-task noise)
    b = build_local(SMALL_VIT, cfg, seed=0)
    assert _same(_state(b), sd)  # the check can see differences
    b.method.load_state_dict(sd["method"])
    b.pool.load_state_dict(sd["pool"])
    b.pool.optimizer.load_state_dict(sd["pool_opt"])
    b.hyper.load_state_dict(sd["hyper_opt"])
    assert _same(_state(b), sd) == []
    assert b.method.hypernet.temperature() == a.method.hypernet.temperature() < cfg.hypernet.t_start
    # and training continues identically from the restored state
    outs = []
    for s in (a, b):
        torch.manual_seed(123)
        outs.append(_step(s, episodes[:2], first=6))
    assert outs[0] == outs[1]
    assert _same(_state(a), _state(b)) == []


def test_same_task_same_w_for_permuted_labels(episodes):
    s = build_local(SMALL_VIT, _cfg(), seed=0)
    with torch.no_grad():
        s.pool.shard.delta.normal_(0, 1e-2)
    ep = episodes[0]
    perm = torch.tensor([2, 0, 3, 1])
    pe = _permuted(ep, perm)
    s.pool.begin_step(train=False)
    w_eval = s.method.task(ep, s.pool, 5, train=False).w
    assert torch.allclose(w_eval, s.method.task(pe, s.pool, 5, train=False).w, atol=1e-6)
    logits, logits_p = s.method.predict(ep, s.pool), s.method.predict(pe, s.pool)
    assert torch.allclose(logits, logits_p[:, perm], atol=1e-5)  # class j's logit is now in column perm[j]
    s.pool.end_eval()
    s.pool.begin_step(train=True)
    w_a = s.method.task(ep, s.pool, 11, train=True).w
    w_b = s.method.task(pe, s.pool, 11, train=True).w
    w_c = s.method.task(ep, s.pool, 12, train=True).w
    s.pool.end_eval()
    assert torch.allclose(w_a, w_b, atol=1e-6)
    assert not torch.allclose(w_a, w_c, atol=1e-4)  # another task index draws other relaxed-Bernoulli noise
    assert float(w_a.sum()) == pytest.approx(1.0, abs=1e-5) and bool((w_a >= 0).all())


def test_nan_loss_raises_naming_the_task(episodes):
    s = build_local(SMALL_VIT, _cfg(), seed=0)
    with torch.no_grad():
        s.pool.shard.delta[0] = float("nan")
    ep = episodes[3]
    with pytest.raises(NonFiniteLoss) as e:
        smat_step(s.method, s.pool, s.hyper, [ep], 41, 41)
    msg = str(e.value)
    assert "task 41" in msg and ep.source in msg and f"episode {ep.index}" in msg


def _query_ce(s, eps) -> float:
    s.pool.begin_step(train=False)
    with torch.no_grad():
        ce = sum(float(s.method.task(ep, s.pool, 0, train=False).metrics["loss/query_ce"]) for ep in eps) / len(eps)
    s.pool.end_eval()
    return ce


@pytest.mark.parametrize("model,delta_lr,steps", [(VIT, 0.05, 20), (CNN, 0.01, 6)], ids=["vit", "cnn"])
def test_vit_and_cnn_train(episodes, model, delta_lr, steps):
    """SMAT steps (2 tasks each) on a fixed set of real episodes lower their eval-mode query loss. The CNN is
    the pre-trained EfficientNet-Lite0 (a smaller delta lr: its features are already good) and gets fewer
    steps, as each costs ~1 s on CPU."""
    cfg = _cfg(experts=2, delta_lr=delta_lr)
    s = build_local(model, cfg, seed=0)
    eps = episodes[:4]
    before = _query_ce(s, eps)
    for step in range(steps):
        out = _step(s, [eps[(2 * step) % 4], eps[(2 * step + 1) % 4]], first=2 * step)
        assert all(k in out for k in ("loss/query_ce", "loss/support_ce", "loss/kd_dense", "loss/kd_pretrained",
                                      "loss/hyper_reg", "loss/sparsity_penalty", "loss/lagrangian"))
    after = _query_ce(s, eps)
    assert after < 0.9 * before, (before, after)
    assert float(s.pool.shard.delta.detach().abs().sum()) > 0
