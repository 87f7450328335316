"""One DeepSpeed step equals one torch step: the same module and optimiser through `DeepSpeedOptimizer` on 2 gloo
ranks (one task each) and through `TorchHyperOptimizer` in one process (both tasks), for P>M>F's dense weights and
SMAT's replicated part (the hypernetwork), at ZeRO 0 and 2.

DeepSpeed 0.19 made `gradient_clipping` 1.0 by default; `ds_config_for` sets every key that changes the arithmetic
from our config. The P>M>F gradient norm is asserted above 1, and an engine given DeepSpeed's default clip is
asserted to land elsewhere, so this test fails if the explicit "no clipping" is lost."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.helpers import run_ranks

pytestmark = pytest.mark.dist
STEPS = 2          # the second step reads the optimiser state (momentum, Adam moments) the first one wrote
WAYS, SHOTS, QUERIES = 3, 2, 2


def _episode(seed: int):
    from smat_dist.data.episodes import Episode

    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES)
    return Episode(support=torch.randn(len(ys), 3, 32, 32, generator=g), support_labels=ys,
                   query=torch.randn(len(yq), 3, 32, 32, generator=g), query_labels=yq,
                   source="random", split="train", index=seed, ways=WAYS, class_names=[str(c) for c in range(WAYS)])


def _configs(name: str):
    from smat_dist.config.schema import Config

    cfg = Config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size = "vit_tiny_patch16_224", 32, 8
    cfg.method.name, cfg.method.experts = name, 4
    cfg.method.pmf_lr = 1e-2          # visible movement in two steps
    return cfg


def _parts(name: str, comm):
    """The module, optimiser and clip value that `build` gives the replicated optimiser (fresh, seed 0)."""
    from smat_dist.build import METHODS
    from smat_dist.model.backbone import FunctionalBackbone, build_backbone

    cfg = _configs(name)
    torch.manual_seed(0)
    fb = FunctionalBackbone(build_backbone(cfg.model), pad_to=comm.world)
    return METHODS[name](fb, cfg.method, 0, comm, comm, "sharded")


def _loss(name: str, module, task: int) -> torch.Tensor:
    ep = _episode(1000 * task + 7)
    if name == "pmf":
        return module.task(ep, None, task, train=True).loss
    # SMAT's replicated part: the hypernetwork on the frozen prototypes, scored against a fixed target mix
    from smat_dist.method.protonet import prototypes

    with torch.no_grad():
        f = module.fb(module.fb.theta_pre, ep.support)
    w, a = module(prototypes(f, ep.support_labels, WAYS), True, task)
    target = torch.softmax(torch.randn(w.shape, generator=torch.Generator().manual_seed(task)), 0)
    return 100.0 * (w - target).square().sum() + module.hypernet.regulariser(a)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _rank(rank: int, world: int, name: str, stage: int, clip_override: float | None):
    from smat_dist.config.schema import DistConfig
    from smat_dist.distributed.comm import Comm
    from smat_dist.distributed.engine import DeepSpeedOptimizer
    from smat_dist.distributed.process_group import init_distributed
    from smat_dist.method.optim import TorchHyperOptimizer

    dcfg = DistConfig(zero_stage=stage)
    init_distributed(dcfg)
    comm = Comm()
    ds_parts = _parts(name, comm)
    clip = ds_parts.clip if clip_override is None else clip_override
    ds = DeepSpeedOptimizer(ds_parts.method, ds_parts.optimizer, dcfg, 1, world, clip)
    ref_parts = _parts(name, comm)
    ref = TorchHyperOptimizer(ref_parts.optimizer, ref_parts.clip)
    init = _state(ref_parts.method)
    norms = []
    for step in range(STEPS):
        ds.backward(_loss(name, ds.engine.module, world * step + rank), 1)
        ds.step(1.0)
        for task in range(world * step, world * (step + 1)):     # the same tasks in one process
            ref.backward(_loss(name, ref_parts.method, task), world)
        params = [p for g in ref.opt.param_groups for p in g["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        ref.step(1.0)
    return {"ds": _state(ds.engine.module), "torch": _state(ref_parts.method), "init": init, "norms": norms,
            "clip": ds.engine.gradient_clipping()}


def _run(name: str, stage: int, clip_override: float | None = None):
    return run_ranks(_rank, 2, name, stage, clip_override)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("name", ["pmf", "smat"])
def test_deepspeed_step_equals_torch_step(name, stage):
    res = _run(name, stage)
    for r in res:
        moved = _max_diff(r["torch"], r["init"])
        assert moved > 1e-5, "the optimiser did not move the parameters: the comparison would be empty"
        diff = _max_diff(r["ds"], r["torch"])
        assert diff < 1e-6 * max(1.0, moved), f"{name} ZeRO {stage}: DeepSpeed and torch differ by {diff}"
    if name == "pmf":
        # P>M>F has no clip; its gradient norm is above DeepSpeed's default clip value, so that default matters
        assert res[0]["clip"] == 0.0
        assert min(res[0]["norms"]) > 1.0, res[0]["norms"]


def test_deepspeed_default_clip_would_change_pmf():
    """The engine given DeepSpeed's own default clip (what an unset key means in 0.19) is not the torch step."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    res = _run("pmf", 0, clip_override=GRADIENT_CLIPPING_DEFAULT)
    assert res[0]["clip"] == GRADIENT_CLIPPING_DEFAULT > 0
    diff = _max_diff(res[0]["ds"], res[0]["torch"])
    assert diff > 1e-4, f"clipping at {GRADIENT_CLIPPING_DEFAULT} changed the step by only {diff}"




K = 2   # tasks per rank


def _rank_k(rank: int, world: int, stage: int, planned: bool):
    """K tasks per rank, one update per step. planned: a planned SMAT step's order on the engine, every task's
    hypernetwork forward first, then one backward per task of a loss already divided by K (`prescaled`: the
    engine must not divide again); else each task's forward then its backward, the engine dividing by K."""
    from smat_dist.config.schema import DistConfig
    from smat_dist.distributed.comm import Comm
    from smat_dist.distributed.engine import DeepSpeedOptimizer
    from smat_dist.distributed.process_group import init_distributed
    from smat_dist.method.optim import TorchHyperOptimizer

    dcfg = DistConfig(zero_stage=stage)
    init_distributed(dcfg)
    comm = Comm()
    ds_parts = _parts("smat", comm)
    ds = DeepSpeedOptimizer(ds_parts.method, ds_parts.optimizer, dcfg, K, world, ds_parts.clip)
    ref_parts = _parts("smat", comm)
    ref = TorchHyperOptimizer(ref_parts.optimizer, ref_parts.clip)
    init = _state(ref_parts.method)
    for step in range(STEPS):
        first = (world * step + rank) * K
        if planned:
            losses = [_loss("smat", ds.engine.module, first + j) for j in range(K)]
            for loss in losses:
                ds.backward(loss / K, K, prescaled=True)
        else:
            for j in range(K):
                ds.backward(_loss("smat", ds.engine.module, first + j), K)
        ds.step(1.0)
        for task in range(world * step * K, world * (step + 1) * K):
            ref.backward(_loss("smat", ref_parts.method, task), world * K)
        ref.step(1.0)
    got = {}
    ds.with_full_params(lambda: got.update(_state(ds.engine.module)))   # ZeRO-3 partitions the parameters
    return {"ds": got, "torch": _state(ref_parts.method), "init": init,
            "micro_steps": ds.engine.micro_steps, "global_steps": ds.engine.global_steps}


@pytest.mark.parametrize("stage,planned", [(0, True), (2, True), (3, True), (3, False)])
def test_several_tasks_per_rank_equal_the_torch_step(stage, planned):
    """Gradient accumulation over a rank's tasks. ZeRO-3 counts micro-steps in engine.forward, which the method
    never calls: before the fix every task but a step's last was dropped at ZeRO-3 (2x the step's movement off)."""
    res = run_ranks(_rank_k, 2, stage, planned)
    for r in res:
        moved = _max_diff(r["torch"], r["init"])
        assert moved > 1e-5
        diff = _max_diff(r["ds"], r["torch"])
        assert diff < 1e-6 * max(1.0, moved), f"ZeRO {stage}: DeepSpeed and torch differ by {diff}"
        assert r["global_steps"] == STEPS and r["micro_steps"] == STEPS * K   # one update per K backwards
