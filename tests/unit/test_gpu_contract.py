"""The GPU contract, checked on the CPU: what would crash or silently change on CUDA / NCCL / bf16 is caught
here with the tools a CPU has (patched device counts, the `meta` device, CPU bf16 autocast, a mode that marks
host-made tensors, a counter of host syncs). Each test names the rule it guards."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from smat_dist.build import build_local
from smat_dist.checkpoint import Checkpointer
from smat_dist.checkpoint.shard_file import ShardReader, write_shard
from smat_dist.config.schema import Config, EvalConfig, MethodConfig, ModelConfig
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.distributed import comm as comm_mod
from smat_dist.distributed.comm import CollectiveError, Comm
from smat_dist.launch.env import LaunchError
from smat_dist.train.state import TrainState
from smat_dist.utils import device as device_mod
from smat_dist.utils.devcheck import HostBornMode, host_born
from smat_dist.utils.device import DeviceError, check_local_ranks, rank_device
from tests.data_fixture import make_dataset

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 1})


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    src = str(make_dataset(tmp_path_factory.mktemp("gpu"), "toy", images=10))
    stream = EpisodeStream(src, "train", EpisodeConfig(mode="fixed", ways=4, shots=2, queries=3, image_size=32),
                           seed=0, train_aug=False)
    eps = [stream.episode(i) for i in range(2)]
    stream.close()
    return eps


def _smat(seed=0, lean=False):
    cfg = MethodConfig(name="smat", experts=3, warmup_tasks=0, total_tasks=10_000)
    cfg.sparsity.lean = lean
    return build_local(TINY, cfg, seed=seed)


# ---------------------------------------------------------------- device selection

def test_device_one_visible_gpu_is_cuda0_whatever_the_local_rank():
    """SLURM --gpus-per-task=1 shows each task one device while LOCAL_RANK counts the node's tasks."""
    assert rank_device(5, visible=1) == torch.device("cuda", 0)
    assert rank_device(3, visible=8) == torch.device("cuda", 3)
    assert rank_device(0, visible=0) == torch.device("cpu")
    with pytest.raises(DeviceError, match="local rank 4 has no GPU: this process sees 4 CUDA devices"):
        rank_device(4, visible=4)


def test_device_more_local_ranks_than_gpus_is_refused_before_any_rank_starts(tmp_path, monkeypatch):
    check_local_ranks(2, visible=0)          # CPU: any number of ranks
    check_local_ranks(2, visible=2)
    with pytest.raises(DeviceError, match="launcher.nproc=2 local ranks but this machine has 1 visible CUDA"):
        check_local_ranks(2, visible=1)
    from smat_dist.launch.local import launch_local

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LaunchError, match="use launcher.nproc=1"):
        launch_local(Config(), str(tmp_path / "run"), nproc=2)
    assert not (tmp_path / "run").exists()   # nothing started, nothing written


# ---------------------------------------------------------------- collectives on the group's device

def _fake_nccl_comm(monkeypatch, **kw) -> Comm:
    """A Comm over a (pretend) 2-rank NCCL group: the device rule runs before any backend call."""
    d = comm_mod.dist
    monkeypatch.setattr(d, "is_initialized", lambda: True)
    monkeypatch.setattr(d, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(d, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(d, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return Comm(**kw)


def test_nccl_collectives_refuse_cpu_tensors_and_name_the_op(monkeypatch):
    c = _fake_nccl_comm(monkeypatch)
    assert c.device == torch.device("cuda", 0)
    for op, t in (("all_reduce", torch.ones(3)), ("all_gather", torch.ones(3)), ("all_to_all", torch.ones(2, 3)),
                  ("reduce_scatter", torch.ones(4))):
        with pytest.raises(CollectiveError, match=f"{op}: a .* tensor on cpu given to a collective over nccl, "
                                                  r"which needs it on cuda:0"):
            getattr(c, op)(t)


def test_bf16_never_reaches_a_pool_collective(monkeypatch):
    d = comm_mod.dist
    monkeypatch.setattr(d, "is_initialized", lambda: True)
    monkeypatch.setattr(d, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(d, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(d, "get_backend", lambda group=None: "gloo")
    pool = Comm(device_bound=True)
    with pytest.raises(CollectiveError, match="full precision, got a .*bfloat16"):
        pool.all_reduce(torch.ones(3, dtype=torch.bfloat16))
    control = Comm()
    monkeypatch.setattr(d, "all_reduce", lambda t, group=None: None)
    control.all_reduce(torch.ones(3, dtype=torch.bfloat16))   # host-side control traffic may be anything


def test_host_born_tensors_are_marked_and_refused_by_device_collectives(monkeypatch):
    """What check_devices adds to a CPU run: a tensor made without device= is where NCCL would refuse it."""
    with HostBornMode():
        a = torch.zeros(3)
        b = torch.zeros(3, device="cpu")
        assert host_born(a) and not host_born(b)
        assert host_born(a + 1) and host_born(a.view(3))
        moved = a.to(torch.device("cpu"))
        assert not host_born(moved) and host_born(a)   # the move is a copy, as on a GPU
        assert not host_born(a.to(torch.float64) + b)
        assert host_born(torch.zeros_like(a)) and not host_born(torch.zeros_like(b))
        from smat_dist.utils.devcheck import HostDeviceMix

        with pytest.raises(HostDeviceMix, match="add: a tensor made without device="):
            torch.add(a, b)             # CUDA: "Expected all tensors to be on the same device"
        c = b.clone()
        c[torch.tensor([0])] = a[:1]    # host indices and values into a device tensor: CUDA allows it
        d = comm_mod.dist
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(d, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(d, "get_backend", lambda group=None: "gloo")
        with pytest.raises(CollectiveError, match="made without device="):
            Comm(device_bound=True).all_reduce(a)


def test_a_model_built_and_never_moved_is_host_born():
    """The mark is the storage's: nn.Parameters made from host tensors carry it until Module.to moves them."""
    with HostBornMode():
        stay = _smat()
        # the backbone and the hypernetwork stay where they were made (the pool follows the backbone's device)
        assert host_born(stay.fb.theta_pre) and host_born(next(stay.method.hypernet.parameters()))
        cfg = MethodConfig(name="smat", experts=3)
        moved = build_local(TINY, cfg, device=torch.device("cpu"))
        tensors = ([moved.fb.theta_pre] + list(moved.method.parameters()) + list(moved.pool.shard.parameters()))
        assert not any(host_born(t) for t in tensors)


# ---------------------------------------------------------------- resume into device memory

def test_shard_reads_stage_through_a_bounded_host_buffer(tmp_path, monkeypatch):
    from smat_dist.checkpoint import shard_file

    t = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0))
    rec = write_shard(tmp_path / "s.safetensors", {"a": t}, {}, block=4096)
    monkeypatch.setattr(shard_file, "STAGE_BYTES", 100)     # many chunks, none aligned to a row
    with ShardReader(tmp_path / "s.safetensors", rec) as r:
        out = torch.empty(300, 7, device="meta")         # .numpy() fails here as on a CUDA tensor
        r.read_rows_into("a", 100, 400, out)
        staged = torch.empty(300 * 7 * 4, dtype=torch.uint8)
        r._read_staged(r.row_start("a", 100), staged)     # the same chunked path into host memory
        assert torch.equal(staged.view(torch.float32).view(300, 7), t[100:400])


def test_resume_into_a_pool_on_another_device(tmp_path):
    """A GPU run builds its pool on the device before the load: the load must not need host memory."""
    a = _smat()
    with torch.no_grad():
        a.pool.shard.log_alpha.add_(torch.randn_like(a.pool.shard.log_alpha))
    ck = Checkpointer(tmp_path / "checkpoints", Comm(), async_save=False)
    ck.save(5, {"pool": a.pool, "train": TrainState(5, 5)}, {"experts": 3})
    final = ck.wait()
    b = _smat(seed=1)
    b.pool.to(torch.device("meta"))
    Checkpointer(tmp_path / "checkpoints", Comm()).load(final, {"pool": b.pool, "train": TrainState()},
                                                         expect={"experts": 3})
    assert b.pool.shard.log_alpha.device.type == "meta"


# ---------------------------------------------------------------- bf16 autocast stays out of the pool

def _merge_and_backward(s, w, g, autocast):
    pool = s.pool
    pool.begin_step(train=True)
    w = w.clone().requires_grad_(True)
    with autocast:
        d = pool.merge(w)
    d.backward(g)
    pool.merger.end_step(None)
    return d.detach(), w.grad, pool.shard.log_alpha.grad


@pytest.mark.parametrize("lean", [False, True])
def test_bf16_autocast_leaves_the_pool_merge_and_its_gradients_fp32(lean):
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(3), 0)
    ref, bf = _smat(lean=lean), _smat(lean=lean)
    g = torch.randn(ref.fb.space.padded)
    d0, gw0, gl0 = _merge_and_backward(ref, w, g, contextlib.nullcontext())
    d1, gw1, gl1 = _merge_and_backward(bf, w, g, torch.autocast("cpu", dtype=torch.bfloat16))
    assert d1.dtype == gw1.dtype == torch.float32
    torch.testing.assert_close(d1, d0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-7)
    if gl0 is not None:
        torch.testing.assert_close(gl1, gl0, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_keeps_the_hypernetwork_noise_finite():
    """u >= 0.998 rounds to 1 in bf16 and log1p(-u) is -inf: the relaxed Bernoulli must be drawn in fp32."""
    s = _smat()
    protos = torch.randn(4, s.fb.feature_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for seed in range(300):
            w, _ = s.method(protos, True, seed)
            assert w.dtype == torch.float32 and bool(torch.isfinite(w).all())


# ---------------------------------------------------------------- no host sync inside a task

class _HostSyncs(TorchFunctionMode):
    """Counts what makes a GPU wait for the host (or the host for the GPU) inside a task."""
    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_training_task_makes_no_host_sync(episodes):
    s = _smat()
    s.pool.begin_step(train=True)
    s.method.task(episodes[0], s.pool, 0, train=True)       # warm: the host mirror of the task counter
    counter = _HostSyncs()
    with counter:
        res = s.method.task(episodes[1], s.pool, 1, train=True)
        s.hyper.backward(res.loss, 2)
    assert counter.seen == []


def test_fp32_region_turns_autocast_off_for_every_device_type(monkeypatch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with device_mod.fp32_region():
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------- evaluation and fine-tuning on the rank's device

def test_finetune_augmentation_stays_on_the_images_device():
    """On a GPU the images are on the device: the augmentation's random draws must follow them there (the
    `meta` device refuses a CPU operand exactly as CUDA does)."""
    from smat_dist.eval.finetune import augment

    x = torch.empty(4, 3, 16, 16, device="meta")
    for seed in range(8):          # both branches of the coin flip
        torch.manual_seed(seed)
        assert augment(x, prob=1.0 if seed % 2 else 0.0).device.type == "meta"


def test_evaluation_loads_a_run_onto_the_rank_device(tmp_path, episodes):
    """smat-eval / smat-analyze build the method and its pool where the rank computes, then load into it."""
    from smat_dist.config.hydra import to_yaml
    from smat_dist.eval.loading import load_method
    from smat_dist.eval.protocol import Evaluator

    cfg = Config()
    cfg.model = TINY
    cfg.method.experts = 3
    a = build_local(cfg.model, cfg.method, seed=cfg.train.seed)
    ck = Checkpointer(tmp_path / "checkpoints", Comm(), async_save=False)
    from smat_dist.eval.loading import ModuleState

    ck.save(4, {"replicated": ModuleState(a.method, "smat"), "pool": a.pool}, {
        "method": "smat", "backbone": cfg.model.name, "backbone_signature": a.fb.space.signature(), "experts": 3},
        texts={"config.yaml": to_yaml(cfg)})
    ck.wait()
    s = load_method(str(tmp_path), device=torch.device("meta"))
    tensors = ([s.fb.theta_pre] + list(s.method.parameters()) + list(s.method.buffers())
               + list(s.pool.shard.parameters()) + list(s.pool.shard.buffers()))
    assert {t.device.type for t in tensors} == {"meta"}
    ev = Evaluator(s, EvalConfig())
    with ev:
        logits = ev.logits(episodes[0], "zeroshot", None, 0)     # the episode follows the model to its device
    assert logits.device.type == "meta" and logits.shape == (len(episodes[0].query), episodes[0].ways)
