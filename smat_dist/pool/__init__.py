"""The expert pool: this rank's shard of delta and the M experts' mask logits, and everything that updates it.

`Pool` (pool.py) is the one component the rest of smat_dist uses (begin_step, merge, end_step, the state;
smat_dist.build assembles it from config). The modules inside are its parts: the storage shard
(shard.py), its chunked passes (passes.py) and fused kernels (kernels.py), the hard-concrete gates (gates.py),
the mask patterns (patterns.py), structured gate groups (groups.py), the merge in one process (merge.py)
and across ranks (sharded.py), the Lagrangian controller (controller.py) and the optimiser (optim.py).
"""
