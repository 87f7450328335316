"""Per-rank memory and bytes-per-step planner, for any timm backbone and expert count, without allocating.

The backbone is built on torch's `meta` device (shapes only) to count its parameters P and to run one
image through it with hooks that add up every leaf module's output: the activations a training forward
keeps for its backward (an estimate; the planner's tests compare it with a measured small point). Every
other figure is a formula of P, the number of experts M, the world size R and the ZeRO stage, and the pool
and communication figures are exact (the tests compare them with real runs to the byte):

  n = ceil(P / R)                     entries of the flat vector per rank (P padded to a multiple of R)
  pool      = 4 n (M + 1)             delta + every expert's mask logits        (fp32 parameters)
  pool grad = 4 n (M + 1)
  pool opt  = 4 n                     SGD momentum for delta (mask logits use momentum 0: no state)
  masks     = 4 n M                   z (no autograd graph: its gradient buffer becomes the logits' gradient)
  transient = 4 n M                   a task's mask-gradient product before it is accumulated
  sharded bytes per task sent, per rank: all-gather w (R-1)*4M, all-to-all of the merged delta (R-1)*n*b,
            its gradient's all-to-all (R-1)*n*b, all-reduce of the w partial sums 2(R-1)*4M  (b: merge dtype bytes)
  gather bytes per task: all-gather of the mask logits (R-1)*4nM, delta (R-1)*4n, valid (R-1)*n, and the
            reduce-scatter of their gradients (R-1)*4nM + (R-1)*4n
  teacher_blockwise (method.teacher.blockwise on an accelerator): the dense teacher's weights take one block
            (the largest) + the non-block tensors on the device instead of P, and its gradient P moves to
            the host (`host_bytes`); on CPU the host is the device, so add `host_bytes` back there.
  teacher_top_fraction=f (method.teacher.top_fraction): the teacher's weights and gradient cover only its top
            blocks and the layers after them (`teacher_top_params`) instead of P.
"""
from __future__ import annotations

import math

import torch

from smat_dist.config.schema import HypernetConfig, ModelConfig

F32 = 4


def _meta_model(mc: ModelConfig):
    from smat_dist.model.backbone import build_backbone

    mc = ModelConfig(name=mc.name, image_size=mc.image_size, patch_size=mc.patch_size, pretrained=None,
                     checkpoint_blocks=False, kwargs=dict(mc.kwargs))
    with torch.device("meta"):
        return build_backbone(mc)


def backbone_shape(mc: ModelConfig) -> dict:
    """P (parameters), feature size and activation elements per image, from a meta-device build."""
    model = _meta_model(mc)
    params = sum(p.numel() for p in model.parameters())
    leaf_out = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            leaf_out[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        from smat_dist.model.backbone import block_units

        block_sizes = [sum(p.numel() for p in m.parameters()) for _, m in block_units(model)]
    except ValueError:                      # no `blocks`: no blockwise teacher for this model
        block_sizes = []
    pe = getattr(model, "patch_embed", None)
    hw = tuple(pe.img_size) if pe is not None and getattr(pe, "img_size", None) else (mc.image_size, mc.image_size)
    with torch.no_grad():
        feat = model(torch.empty(1, 3, *hw, device="meta"))
    for h in handles:
        h.remove()
    after = 0
    if block_sizes:
        from smat_dist.method.teacher import after_blocks

        named = dict(model.named_parameters())
        after = sum(named[n].numel() for n in after_blocks(model))
    return {"params": int(params), "feature_dim": int(feat.shape[-1]), "act_elems_per_image": int(leaf_out[0]),
            "input_hw": list(hw), "largest_block": int(max(block_sizes, default=0)), "block_sizes": block_sizes,
            "after_blocks_params": int(after),
            "nonblock_params": int(params - sum(block_sizes)) if block_sizes else int(params)}


def teacher_top_params(shape: dict, fraction: float) -> int:
    """Parameters the top teacher adapts: its top units (method.teacher.top_layout's rounding) + the layers
    after the blocks."""
    from smat_dist.method.teacher import top_units

    sizes = shape["block_sizes"]
    if not sizes:
        raise ValueError(f"plan: teacher_top_fraction={fraction} needs a model with 'blocks'")
    k = top_units(len(sizes), fraction)
    return int(sum(sizes[len(sizes) - k:]) + shape["after_blocks_params"])


def hypernet_params(dim: int, experts: int, cfg: HypernetConfig | None = None) -> int:
    """Trainable parameters of HyperNetwork(dim, experts): tokens, one pre-LN block, expert keys."""
    cfg = cfg or HypernetConfig()
    hidden = int(dim * cfg.mlp_ratio)
    block = 2 * dim + 3 * dim * dim + (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    return cfg.tokens * dim + block + experts * dim


def sent_bytes_per_task(params: int, experts: int, ranks: int, path: str, merge_bytes: int = F32) -> int:
    """Bytes one rank sends per task for the pool's merge (forward + backward), as Comm counts them."""
    R, M = ranks, experts
    if R == 1:
        return 0
    n = math.ceil(params / R)
    if path == "sharded":
        # all_to_all counts (R-1)/R of an [R, n] buffer = (R-1) n elements
        return int((R - 1) * F32 * M + 2 * (R - 1) * n * merge_bytes + 2 * (R - 1) / R * R * M * F32)
    if path == "gather":
        return int((R - 1) * n * M * F32 + (R - 1) * n * F32 + (R - 1) * n * 1
                   + (R - 1) * n * M * F32 + (R - 1) * n * F32)
    raise ValueError(f"path={path!r}: expected sharded or gather")


def plan(model: str = "vit_tiny_patch16_224", experts: int = 8, ranks: int = 1, zero_stage: int = 0,
         image_size: int = 84, patch_size: int | None | str = "auto", batch_images: int = 150,
         act_bytes: int = F32, merge_bytes: int = F32, tasks_per_rank: int = 1,
         kwargs: dict | None = None, teacher_blockwise: bool = False, lean: bool = False,
         teacher_top_fraction: float = 1.0, fs_gbps: float = 2.0) -> dict:
    """Per-rank memory (bytes) and bytes sent per step for one configuration; nothing is allocated."""
    from smat_dist.bench.step import model_config

    if ranks < 1 or experts < 1 or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"plan: need ranks>=1, experts>=1, zero_stage in 0..3; got {ranks}, {experts}, {zero_stage}")
    mc = model_config(model, image_size, patch_size)
    if kwargs:
        mc.kwargs = {**mc.kwargs, **kwargs}
    shape = backbone_shape(mc)
    P, M, R = shape["params"], experts, ranks
    n = math.ceil(P / R)
    padded = n * R
    H = hypernet_params(shape["feature_dim"], M)
    if teacher_blockwise and not shape["largest_block"]:
        raise ValueError(f"plan: teacher_blockwise (method.teacher.blockwise=true) needs a model with 'blocks'; "
                         f"{model} has none")
    # The blockwise teacher's gradient is on the device only between its autograd.grad and its copy to the
    # host, before the outer gradient exists: it takes no slot of its own there.
    teacher_device = F32 * (shape["largest_block"] + shape["nonblock_params"]) if teacher_blockwise else None
    top = teacher_top_params(shape, teacher_top_fraction) if teacher_top_fraction != 1.0 else None
    if top is not None and teacher_blockwise:
        raise ValueError("plan: teacher_blockwise and teacher_top_fraction < 1: choose one")
    if top is not None:
        teacher_device = F32 * top
    rep_div = {"params": R if zero_stage >= 3 else 1, "grads": R if zero_stage >= 2 else 1,
               "opt": R if zero_stage >= 1 else 1}
    mem = {
        "pool_params": F32 * n * (M + 1),
        # delta's and the logits' gradient (a buffer reused every step); lean: delta's only
        "pool_grads": F32 * n * (1 if lean else M + 1),
        "pool_optimizer": F32 * n,
        "pool_masks": 0 if lean else F32 * n * M,   # z of the step (a buffer reused every step); lean: none
        # the masks' gradient stays factored, U [n, k*R] x W [k*R, M] (the per-merge pieces and their
        # concatenation), dense n x M only once k*R >= M; plus three reused chunk buffers of the fused passes
        "pool_transient": 2 * F32 * n * min(tasks_per_rank * R, M) + 4 * F32 * min(1 << 21, n * M),
        "replicated_params": math.ceil(F32 * H / rep_div["params"]),
        "replicated_grads": math.ceil(F32 * H / rep_div["grads"]),
        "replicated_optimizer": math.ceil(2 * F32 * H / rep_div["opt"]),   # AdamW: exp_avg + exp_avg_sq
        "frozen_backbone": 2 * F32 * P,         # the timm module's own weights + the flat theta_pre
        # theta, theta' (inner step), teacher theta (blockwise: its largest block + the non-block tensors)
        "task_weights": 3 * F32 * padded if teacher_device is None else 2 * F32 * padded + teacher_device,
        # inner-step gradient, teacher gradient (blockwise: on the host), outer gradient of theta
        # (top teacher: its top tensors only)
        "task_grads": (2 if teacher_blockwise else 3) * F32 * padded if top is None else 2 * F32 * padded + F32 * top,
        "activations_per_image": act_bytes * shape["act_elems_per_image"],
    }
    # Student passes 2 (support) and 3 (query) keep their graphs alive together until the outer backward.
    mem["activations"] = mem["activations_per_image"] * batch_images
    mem["pool_total"] = mem["pool_params"] + mem["pool_grads"] + mem["pool_optimizer"] + mem["pool_masks"]
    mem["replicated_total"] = mem["replicated_params"] + mem["replicated_grads"] + mem["replicated_optimizer"]
    # The gather path also holds every expert's mask logits (gathered), their gate recomputed with a graph
    # and the gradient before its reduce-scatter, per task: about 4 P M floats on top.
    gather_extra = 4 * F32 * padded * M
    base = (mem["pool_total"] + mem["replicated_total"] + mem["frozen_backbone"] + mem["task_weights"]
            + mem["task_grads"] + mem["activations"])
    sharded_merge_buf = 2 * F32 * padded if R > 1 else 0   # the [R, n] merged deltas sent and received
    out = {
        "model": model, "image_size": image_size, "patch_size": mc.patch_size, "depth": mc.kwargs.get("depth"),
        "experts": M, "ranks": R, "zero_stage": zero_stage, "lean": lean, "params": P, "padded": padded,
        "feature_dim": shape["feature_dim"], "hypernet_params": H, "batch_images": batch_images,
        "mask_logits_total": P * M, "teacher_blockwise": bool(teacher_blockwise),
        "largest_block": shape["largest_block"], "teacher_top_fraction": teacher_top_fraction,
        "teacher_top_params": top if top is not None else P,
        "memory_bytes": mem,
        "host_bytes": {"teacher_gradient": F32 * padded if teacher_blockwise else 0},
        "peak_bytes": {"sharded": base + max(sharded_merge_buf, mem["pool_transient"]),
                       "gather": base + max(gather_extra, mem["pool_transient"])},
        "sent_bytes_per_task": {p: sent_bytes_per_task(P, M, R, p, merge_bytes) for p in ("sharded", "gather")},
        # per step: k tasks of merge traffic + the hypernetwork all-reduce (ZeRO 0) or reduce-scatter +
        # all-gather (ZeRO 1-3: the same ring volume) + the sparsity terms' all-reduce (4M+1 float64).
        "replicated_bytes_per_step": int(2 * (R - 1) / R * F32 * H),
        "control_bytes_per_step": int(2 * (R - 1) / R * 8 * (4 * M + 1) + 2 * (R - 1) / R * 8),
    }
    # The checkpoint a rank writes and reads: its pool slice (delta, its momentum, the M logits rows) in
    # one shard file; the replicated module's share is small beside it. Times at `fs_gbps` GB/s per rank
    # (a parallel filesystem's per-client figure: a stated assumption, not a measurement). Each rank hashes
    # while writing and verifies only what it reads, so hashing adds no pass over other ranks' files.
    ck_bytes = F32 * n * (M + 2) + math.ceil(F32 * 3 * H / rep_div["opt"])
    out["checkpoint"] = {"bytes_per_rank": ck_bytes, "bytes_total": ck_bytes * R, "fs_gbps_per_rank": fs_gbps,
                         "save_s": ck_bytes / (fs_gbps * 1e9), "resume_s": ck_bytes / (fs_gbps * 1e9),
                         "async_host_copy_bytes": F32 * n * (M + 2)}
    fixed = out["replicated_bytes_per_step"] + out["control_bytes_per_step"]
    out["sent_bytes_per_step"] = {p: tasks_per_rank * v + fixed
                                  for p, v in out["sent_bytes_per_task"].items()}
    return out


def parse_kv(args: list[str]) -> dict:
    """`key=value` arguments (Hydra style) -> plan() keyword arguments, with a clear error for unknown keys."""
    import inspect

    known = inspect.signature(plan).parameters
    out: dict = {}
    for a in args:
        if "=" not in a:
            raise ValueError(f"plan argument {a!r}: expected key=value (keys: {', '.join(known)})")
        k, v = a.split("=", 1)
        k = {"images": "batch_images", "batch": "batch_images", "zero": "zero_stage"}.get(k, k)
        if k == "depth":
            out.setdefault("kwargs", {})["depth"] = int(v)
            continue
        if k not in known:
            raise ValueError(f"plan argument {k!r}: unknown key (keys: {', '.join(known)}, depth)")
        if k in ("model",):
            out[k] = v
        elif k in ("teacher_blockwise", "lean"):
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"plan argument {k}={v!r}: expected true or false")
            out[k] = v.lower() in ("true", "1")
        elif k == "patch_size":
            out[k] = "auto" if v == "auto" else (None if v in ("none", "null") else int(v))
        elif k in ("teacher_top_fraction", "fs_gbps"):
            out[k] = float(v)
        else:
            out[k] = int(v)
    return out
