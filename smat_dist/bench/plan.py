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
  planned   = 4 P min(k, M // R)      released masks (default): no z while the tasks run, their merged masks
                                      from the step's mask pass instead (k tasks per rank; pool/merge.py)
  transient = 4 n M                   a task's mask-gradient product before it is accumulated
  sharded bytes per task sent, per rank: all-gather w (R-1)*4M, all-to-all of the merged delta (R-1)*n*b,
            its gradient's all-to-all (R-1)*n*b, all-reduce of the w partial sums 2(R-1)*4M  (b: merge dtype bytes)
  gather bytes per task: all-gather of the mask logits (R-1)*4nM, delta (R-1)*4n, valid (R-1)*n, and the
            reduce-scatter of their gradients (R-1)*4nM + (R-1)*4n
  zero3 bytes per task (dist.pool=zero3, DeepSpeed's comms logger): all-gather of delta and the M logits
            (R-1)*4n(M+1), reduce-scatter of their gradients (R-1)*4n(M+1)
  zero3 memory: the partitions n(M+1) three times (DeepSpeed's working copy, its fp32 master, the gradient)
            + delta's momentum n, and the gathered pool with its gate's saved tensors and backward transients:
            ZERO3_FULL_ARRAYS x 4PM, a count measured (smat-bench scale, ViT-Ti depth 6, M 16 -> 64 on 2 ranks:
            the peak grew by 8.5 arrays of 4PM, 1.5 of them the partitions), not derived
  teacher_blockwise (method.teacher.blockwise on an accelerator): the dense teacher's weights take one block
            (the largest) + the non-block tensors on the device instead of P, and its gradient P moves to
            the host (`host_bytes`); on CPU the host is the device, so add `host_bytes` back there.
  teacher_top_fraction=f (method.teacher.top_fraction): the teacher's weights and gradient cover only its top
            blocks and the layers after them (`teacher_top_params`) instead of P.
  time per step (plan_step_s and its parts): the meta forward's counted FLOPs and the figures above over a
            device's stated rates, a plan and not a measurement (smat_dist/bench/plan_time.py).
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from smat_dist.bench import plan_time
from smat_dist.config.schema import HypernetConfig, ModelConfig

F32 = 4
# [P, M] fp32 arrays a dist.pool=zero3 rank holds at its peak beside its partitions (see the module docstring)
ZERO3_FULL_ARRAYS = 7
PATHS = ("sharded", "gather", "zero3")


def model_config(name: str, image_size: int, patch_size: int | None | str = "auto", depth: int | None = None
                 ) -> ModelConfig:
    """ModelConfig for the bench: ViTs use patch 12 at 84 px (ModelConfig's default) and their own patch
    size at other resolutions (`patch_size='auto'`); `depth` truncates a ViT (memory-bound scale points)."""
    mc = ModelConfig(name=name, image_size=image_size)
    if patch_size == "auto":
        mc.patch_size = 12 if image_size == 84 else None
    else:
        mc.patch_size = patch_size
    if depth is not None:
        mc.kwargs = {**mc.kwargs, "depth": int(depth)}
    return mc


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
    # the same forward counts its FLOPs (matmuls, convolutions, attention), for the planned time (plan_time.py)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        feat = model(torch.empty(1, 3, *hw, device="meta"))
    for h in handles:
        h.remove()
    saved = saved_activations(model, hw)
    after = 0
    if block_sizes:
        from smat_dist.method.teacher import after_blocks

        named = dict(model.named_parameters())
        after = sum(named[n].numel() for n in after_blocks(model))
    return {"params": int(params), "feature_dim": int(feat.shape[-1]), "act_elems_per_image": int(leaf_out[0]),
            "input_hw": list(hw), "flops_per_image": int(fc.get_total_flops()),
            "largest_block": int(max(block_sizes, default=0)), "block_sizes": block_sizes,
            "after_blocks_params": int(after), **saved,
            "nonblock_params": int(params - sum(block_sizes)) if block_sizes else int(params)}


def saved_activations(model, hw) -> dict:
    """Bytes autograd saves for the backward of one image's forward, counted on the meta device (tensors that
    views of one another share counted once, the weights not at all): in total, inside each block, and the
    blocks' inputs, which is what a checkpointed forward keeps (model.checkpoint_blocks)."""
    try:
        from smat_dist.model.backbone import block_units

        units = [m for _, m in block_units(model)]
    except ValueError:
        units = []
    params = {id(p) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    where = [None]
    inside: dict = {}
    block_in = [0]
    seen: set = set()

    def pack(t):
        b = t._base if t._base is not None else t
        if id(b) not in params and id(b) not in seen:
            seen.add(id(b))
            inside[where[0]] = inside.get(where[0], 0) + b.numel() * b.element_size()
        return t

    def enter(i):
        def hook(_m, args):
            where[0] = i
            if args and isinstance(args[0], torch.Tensor):
                block_in[0] += args[0].numel() * args[0].element_size()
        return hook

    def leave(_m, _a, _o):
        where[0] = None

    handles = [u.register_forward_pre_hook(enter(i)) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.empty(1, 3, *hw, device="meta"))
    finally:
        for h in handles:
            h.remove()
    per_block = [inside.get(i, 0) for i in range(len(units))]
    return {"saved_bytes_per_image": int(sum(inside.values())), "saved_outside_blocks": int(inside.get(None, 0)),
            "saved_largest_block": int(max(per_block, default=0)), "block_inputs_bytes": int(block_in[0])}


def activation_bytes_per_image(shape: dict, checkpoint_blocks: bool, precision: str) -> int:
    """What a training forward keeps per image until its backward: every saved tensor, or, with checkpointed
    blocks, the blocks' inputs and what lies outside them (one block's tensors are rebuilt at a time: the
    planner adds that block's share for the whole batch as the backward's working set). bf16 autocast stores
    the matmuls' outputs at 2 bytes: the fp32 count is halved, an approximation (norms keep fp32 inputs)."""
    if checkpoint_blocks and shape["block_inputs_bytes"]:
        b = shape["block_inputs_bytes"] + shape["saved_outside_blocks"]
    else:
        b = shape["saved_bytes_per_image"]
    return b // 2 if precision == "bf16" else b


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
    if path == "zero3":
        return 2 * (R - 1) * n * (M + 1) * F32
    raise ValueError(f"path={path!r}: expected one of {', '.join(PATHS)}")


def plan(model: str = "vit_tiny_patch16_224", experts: int = 8, ranks: int = 1, zero_stage: int = 0,
         image_size: int = 84, patch_size: int | None | str = "auto", batch_images: int | None = None,
         act_bytes: int = F32, merge_bytes: int = F32, tasks_per_rank: int = 1,
         kwargs: dict | None = None, teacher_blockwise: bool = False, lean: bool = False,
         teacher_top_fraction: float = 1.0, fs_gbps: float = 2.0, precision: str | None = None,
         checkpoint_blocks: bool = False, release_masks: bool = True, support: int | None = None,
         query: int | None = None, device: str = "h100", mfu: float | None = None,
         peak_tflops: float | None = None, mem_gbps: float | None = None, link_gbps: float | None = None) -> dict:
    """Per-rank memory (bytes), bytes sent and planned seconds per step for one configuration; nothing is
    allocated.

    precision: "fp32" or "bf16" (autocast) activations (default: bf16 when act_bytes=2); checkpoint_blocks:
    model.checkpoint_blocks (only the blocks' inputs are kept; one block is rebuilt at a time).
    support + query = batch_images (default 150 = 50 + 100, 10-way 5-shot 10-query; batch_images alone is
    split 1:2 like it); device, mfu and the rates: plan_time.py (`cpu` measures this machine, ~1 s)."""
    if support is None and query is None:
        batch_images = 150 if batch_images is None else batch_images
        support = batch_images // 3
        query = batch_images - support
    elif support is None or query is None or (batch_images is not None and batch_images != support + query):
        raise ValueError(f"plan: give support and query together (and batch_images = their sum); got "
                         f"support={support}, query={query}, batch_images={batch_images}")
    batch_images = support + query
    precision = precision or ("bf16" if act_bytes == 2 else "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"plan: precision={precision!r}: expected fp32 or bf16")
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
        # delta's gradient; the logits' is written over the step's masks (pool_masks), lean: never stored
        "pool_grads": F32 * n,
        "pool_optimizer": F32 * n,
        # z of the step, then the logits' gradient in the same buffer (reused every step); lean: none
        "pool_masks": 0 if lean else F32 * n * M,
        # the masks' gradient stays factored, U [n, k*R] x W [k*R, M] (the per-merge pieces and their
        # concatenation), dense n x M only once k*R >= M; plus three reused chunk buffers of the fused passes
        "pool_transient": 2 * F32 * n * min(tasks_per_rank * R, M) + 4 * F32 * min(1 << 21, n * M),
        # released masks: the step's merges planned in its mask pass wait for their tasks, one P-long vector
        # per round (R tasks x n), min(k, M // R) rounds per pass (pool/merge.py), instead of the masks
        "pool_planned": F32 * padded * min(tasks_per_rank, max(1, M // R)) if release_masks and not lean else 0,
        "replicated_params": math.ceil(F32 * H / rep_div["params"]),
        "replicated_grads": math.ceil(F32 * H / rep_div["grads"]),
        "replicated_optimizer": math.ceil(2 * F32 * H / rep_div["opt"]),   # AdamW: exp_avg + exp_avg_sq
        "frozen_backbone": F32 * padded,        # theta_pre; the timm module's weights are views into it
        # theta, theta' (inner step), teacher theta (blockwise: its largest block + the non-block tensors)
        "task_weights": 3 * F32 * padded if teacher_device is None else 2 * F32 * padded + teacher_device,
        # inner-step gradient, teacher gradient (blockwise: on the host), outer gradient of theta
        # (top teacher: its top tensors only)
        "task_grads": (2 if teacher_blockwise else 3) * F32 * padded if top is None else 2 * F32 * padded + F32 * top,
        # what autograd keeps per image (saved tensors, counted on the meta device; see saved_activations)
        "activations_per_image": activation_bytes_per_image(shape, checkpoint_blocks, precision),
    }
    # Student passes 2 (support) and 3 (query) keep their graphs alive together until the outer backward.
    mem["activations"] = mem["activations_per_image"] * batch_images
    # The backward's working set: the gradients of one block's saved tensors at a time (and, with checkpointed
    # blocks, that block's rebuilt tensors beside them).
    block = shape["saved_largest_block"] // (2 if precision == "bf16" else 1)
    mem["backward_working_set"] = block * batch_images * (2 if checkpoint_blocks else 1)
    mem["pool_total"] = mem["pool_params"] + mem["pool_grads"] + mem["pool_optimizer"] + mem["pool_masks"]
    mem["replicated_total"] = mem["replicated_params"] + mem["replicated_grads"] + mem["replicated_optimizer"]
    # The gather path also holds every expert's mask logits (gathered), their gate recomputed with a graph
    # and the gradient before its reduce-scatter, per task: about 4 P M floats on top, and its slice's
    # autograd gradient of the logits (n M).
    gather_extra = 4 * F32 * padded * M + F32 * n * M
    base = (mem["pool_total"] + mem["replicated_total"] + mem["frozen_backbone"] + mem["task_weights"]
            + mem["task_grads"] + mem["activations"] + mem["backward_working_set"])
    # P>M>F on the same backbone and episode: the frozen backbone, its dense delta with gradient and SGD
    # momentum, the task's weights and their gradient, one forward of the batch kept for the backward.
    pmf_peak = (mem["frozen_backbone"] + 3 * F32 * padded + 2 * F32 * padded + mem["activations"]
                + mem["backward_working_set"])
    sharded_merge_buf = 2 * F32 * padded if R > 1 else 0   # the [R, n] merged deltas sent and received
    if release_masks and not lean:
        # method.sparsity.release_masks: the masks are never stored while a task's graph is alive (the step's
        # merges are planned in its mask pass); the logits' gradient takes their place after the graph is gone
        sharded_peak = max(base - mem["pool_masks"] + sharded_merge_buf + mem["pool_planned"],
                           mem["pool_total"] + mem["replicated_total"] + mem["frozen_backbone"] + mem["pool_transient"])
    else:
        sharded_peak = base + max(sharded_merge_buf, mem["pool_transient"])
    # dist.pool=zero3: DeepSpeed's partitions (working, fp32 master, gradient) and delta's momentum instead of
    # the sharded pool's arrays, and the gathered pool with its gate's graph (ZERO3_FULL_ARRAYS, measured)
    zero3_peak = (base - mem["pool_total"] + 3 * F32 * n * (M + 1) + F32 * n
                  + ZERO3_FULL_ARRAYS * F32 * padded * M)
    out = {
        "model": model, "image_size": image_size, "patch_size": mc.patch_size, "depth": mc.kwargs.get("depth"),
        "experts": M, "ranks": R, "zero_stage": zero_stage, "lean": lean, "params": P, "padded": padded,
        "feature_dim": shape["feature_dim"], "hypernet_params": H, "batch_images": batch_images,
        "mask_logits_total": P * M, "teacher_blockwise": bool(teacher_blockwise),
        "largest_block": shape["largest_block"], "teacher_top_fraction": teacher_top_fraction,
        "teacher_top_params": top if top is not None else P,
        "memory_bytes": mem,
        "host_bytes": {"teacher_gradient": F32 * padded if teacher_blockwise else 0},
        "precision": precision, "checkpoint_blocks": bool(checkpoint_blocks),
        "peak_bytes": {"sharded": sharded_peak,
                       "gather": base + max(gather_extra, mem["pool_transient"]), "zero3": zero3_peak,
                       "pmf": pmf_peak},
        # alive at the same time as the peak but outside these sums: a GPU's CUDA context and NCCL buffers
        # (~0.5-1 GB, driver- and topology-dependent), and on the host the async checkpoint's copy of the pool
        # slice (kept between saves, pinned on GPU machines: `checkpoint.async_host_copy_bytes`); evaluation
        # and validation build eval masks beside the training ones (`eval_masks_bytes`).
        "eval_masks_bytes": 0 if lean else F32 * n * M,
        "sent_bytes_per_task": {p: sent_bytes_per_task(P, M, R, p, merge_bytes) for p in PATHS},
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
    dev = plan_time.device_for(device, mfu, peak_tflops, mem_gbps, link_gbps)
    out.update(plan_time.plan_times(dev, shape["flops_per_image"], support, query, P, M, R,
                                    out["sent_bytes_per_step"], tasks_per_rank, teacher_top_fraction, release_masks))
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
        if k in ("model", "device"):
            out[k] = v
        elif k == "precision":
            out[k] = v
        elif k in ("teacher_blockwise", "lean", "checkpoint_blocks", "release_masks"):
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"plan argument {k}={v!r}: expected true or false")
            out[k] = v.lower() in ("true", "1")
        elif k == "patch_size":
            out[k] = "auto" if v == "auto" else (None if v in ("none", "null") else int(v))
        elif k in ("teacher_top_fraction", "fs_gbps", "mfu", "peak_tflops", "mem_gbps", "link_gbps"):
            out[k] = float(v)
        else:
            out[k] = int(v)
    return out
