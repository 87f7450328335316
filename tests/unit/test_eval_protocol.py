"""Meta-testing: fine-tuning modes fit the support set, LoRA restores, lr search on validation episodes only,
results identical across reruns and world sizes (1 vs 2 gloo ranks)."""
from __future__ import annotations

import pytest
import torch

from smat_dist.build import build_local
from smat_dist.config.schema import EvalConfig, MethodConfig, ModelConfig
from smat_dist.data.episodes import EpisodeConfig
from smat_dist.eval.finetune import LoraRunner, finetune_full, support_loss, task_theta
from smat_dist.eval.protocol import Domain, Evaluator, evaluate
from tests.data_fixture import make_dataset

MODEL = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, kwargs={"depth": 2})
EP_CFG = EpisodeConfig(mode="fixed", ways=3, shots=3, queries=3, image_size=32)


def make_setups(seed: int = 0, sharded: bool = False):
    """SMAT (with a non-zero dense delta so the merge matters) and the pre-trained baseline on one backbone;
    sharded: this rank holds only its slice of the pool and merges through the sharded merger."""
    if sharded:
        from smat_dist.build import build
        from smat_dist.distributed.comm import Comm

        smat = build(MODEL, MethodConfig(experts=4), seed=seed, comm=Comm(), merge="sharded", hyper=None)
    else:
        smat = build_local(MODEL, MethodConfig(experts=4), seed=seed)
    store = smat.pool.shard
    g = torch.Generator().manual_seed(123)
    full = torch.randn(store.numel, generator=g) * 0.05      # the same delta whatever the slicing
    with torch.no_grad():
        hi = min(store.hi, store.numel)
        store.delta[: hi - store.lo].copy_(full[store.lo:hi])
    pre = build_local(MODEL, MethodConfig(name="pretrained"), seed=seed, fb=smat.fb)
    return {"smat": smat, "pretrained": pre}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    a = make_dataset(root, "alpha", images=10)
    b = make_dataset(root, "beta", splits={"train": 4, "test": 5}, images=8)  # OOD without a val split
    return [Domain("alpha", str(a), "id"), Domain("beta", str(b), "ood")]


@pytest.fixture(scope="module")
def setups():
    return make_setups()


def pattern_episode(shots: int = 4, queries: int = 3, seed: int = 0):
    """3-way episode of striped images (horizontal / vertical / diagonal, random frequency and phase, noise):
    the frozen random-init features separate them only partly (support CE about 0.4), so fitting the support
    set takes a real change of the weights, and the augmentation (colour, translation, flip) keeps the classes."""
    import math

    from smat_dist.data.episodes import Episode

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def img(c):
        f = 2 * math.pi / (4 + 4 * torch.rand((), generator=g))
        ph = 2 * math.pi * torch.rand((), generator=g)
        v = (torch.sin(f * yy + ph), torch.sin(f * xx + ph), torch.sin(f * (xx + yy) / 1.414 + ph))[c]
        return v.expand(3, 32, 32) + 0.3 * torch.randn(3, 32, 32, generator=g)

    ys = [c for c in range(3) for _ in range(shots)]
    yq = [c for c in range(3) for _ in range(queries)]
    return Episode(torch.stack([img(c) for c in ys]), torch.tensor(ys), torch.stack([img(c) for c in yq]),
                   torch.tensor(yq), "patterns", "test", 0, 3, ["h", "v", "d"])


def test_finetuning_fits_support_better_than_zeroshot(setups):
    s = setups["smat"]
    ep = pattern_episode()
    with Evaluator(s, EvalConfig()):
        theta = task_theta(s, ep)
        zs = s.method.predict(ep, s.pool)
    embed0 = lambda x: s.fb(theta, x)  # noqa: E731
    # the zero-shot prediction is exactly the task model at theta with support prototypes
    from smat_dist.eval.finetune import _predict

    assert torch.allclose(_predict(embed0, ep, 10.0), zs, atol=1e-5)
    torch.manual_seed(0)
    full = finetune_full(s.fb, theta, ep, lr=1e-4, steps=8)
    assert full.support_loss_before == pytest.approx(support_loss(embed0, ep), rel=1e-5)
    assert full.support_loss_after < 0.7 * full.support_loss_before, full
    runner = LoraRunner(s.fb, rank=8, alpha=32)
    before_params = s.fb.model.state_dict()
    torch.manual_seed(0)
    lora0 = runner.adapt(theta, ep, lr=1e-3, steps=0)
    # zero steps: B = 0, so the adapted copy is the task model itself
    assert torch.allclose(lora0.logits, zs, atol=1e-4)
    torch.manual_seed(0)
    lora = runner.adapt(theta, ep, lr=1e-4, steps=8)  # LoRA runs at 10x: 1e-3
    assert lora.support_loss_before == pytest.approx(full.support_loss_before, rel=1e-4)
    assert lora.support_loss_after < 0.7 * lora.support_loss_before, lora
    # restored per task: the same task again gives the same result; the caller's backbone is untouched
    torch.manual_seed(0)
    again = runner.adapt(theta, ep, lr=1e-4, steps=8)
    assert torch.equal(again.logits, lora.logits)
    assert all(torch.equal(v, s.fb.model.state_dict()[k]) for k, v in before_params.items())


def test_lora_rejects_backbones_without_attention_or_convs():
    from smat_dist.model.backbone import FunctionalBackbone

    fb = FunctionalBackbone(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 8)))
    with pytest.raises(ValueError, match="qkv/proj"):  # CNNs get Conv2d LoRA: tests/unit/test_eval_lora_cnn.py
        LoraRunner(fb)


CFG = EvalConfig(episodes=5, modes=["zeroshot", "full", "lora"], finetune_steps=2, lr_grid=[1e-4, 1e-3],
                 val_episodes=2)


def _eval_on_ranks(rank, world, domains, sharded=False):
    torch.set_num_threads(1)
    setups = make_setups(sharded=sharded)
    res, per = evaluate(setups, domains, CFG, EP_CFG)
    if sharded:
        res["pool_entries_here"] = setups["smat"].pool.shard.log_alpha.shape[0]
    return res, per


@pytest.fixture(scope="module")
def single(data):
    """One world-size-1 evaluation in this process, one thread as in the spawned ranks (same kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _eval_on_ranks(0, 1, data)
    finally:
        torch.set_num_threads(threads)


def test_results_and_lr_choice(data, single):
    res, per = single
    r = res["results"]
    for m in ("smat", "pretrained"):
        for mode in CFG.modes:
            doms = r[m][mode]["domains"]
            assert [len(per[m][mode][d.name]) for d in data] == [5, 5]
            assert doms["alpha"]["n"] == 5 and 0 <= doms["alpha"]["mean"] <= 1 and doms["alpha"]["ci95"] >= 0
            assert r[m][mode]["id_avg"] == doms["alpha"]["mean"] and r[m][mode]["ood_avg"] == doms["beta"]["mean"]
            if mode != "zeroshot":
                # alpha has validation classes; beta has none and takes the pooled-validation choice
                assert doms["alpha"]["lr_source"] == "val" and doms["beta"]["lr_source"] == "pooled-val"
                assert doms["alpha"]["lr"] in CFG.lr_grid
                assert set(doms["alpha"]["val_scores"]) == {repr(x) for x in sorted(CFG.lr_grid)}
    assert res["meta"]["world_size"] == 1


def test_bad_config_is_named(data, setups):
    with pytest.raises(ValueError, match="eval.modes"):
        evaluate(setups, data, EvalConfig(modes=["zeroshot", "fulll"]), EP_CFG)
    with pytest.raises(ValueError, match="eval.lr_grid"):
        evaluate(setups, data, EvalConfig(modes=["full"], lr_grid=[]), EP_CFG)
