"""Settings that are valid but make no sense for this run, said before anything starts (smat-train's
pre-flight logs each as a warning; none of them stops the run).

A schedule longer than the run (the warmup, the merge temperature's decay, the cosine horizon) silently trains
a different method than the one configured: a 40-task run under the default 400-task warmup never leaves
10% of its learning rate. A data source without the classes the run will ask of it is found from spec.json.
Here, beside the launcher that says them, rather than in config: reading a source's spec needs smat_dist.data.
"""
from __future__ import annotations

from smat_dist.config.schema import Config, EpisodeMode


def schedule_warnings(cfg: Config) -> list[str]:
    m, tasks = cfg.method, cfg.train.tasks
    out = []
    if m.name not in ("smat", "pmf"):
        return out
    if m.warmup_tasks > tasks:
        out.append(f"method.warmup_tasks={m.warmup_tasks} is longer than the run (train.tasks={tasks}): the "
                   f"learning rate ramps all run long and ends at {tasks / m.warmup_tasks:.0%} of its peak; set e.g. "
                   f"method.warmup_tasks={max(1, tasks // 10)}")
    if m.total_tasks < tasks:
        out.append(f"method.total_tasks={m.total_tasks} is shorter than the run (train.tasks={tasks}): the cosine "
                   f"schedule reaches a learning rate of 0 at task {m.total_tasks} and the rest of the run does not "
                   "learn; set method.total_tasks=${train.tasks} (the method configs' default)")
    h = m.hypernet
    if m.name == "smat" and h.t_start > h.t_min:
        needed = (h.t_start - h.t_min) * h.t_decay
        if needed > tasks:
            end = h.t_start - tasks / h.t_decay
            out.append(f"method.hypernet.t_decay={h.t_decay:g}: the merge temperature reaches t_min={h.t_min:g} "
                       f"only after {needed:.0f} tasks, the run has {tasks}, so it ends at T={end:.3g} (from "
                       f"t_start={h.t_start:g}); drop the override to tie the decay to train.tasks")
    return out


def data_warnings(cfg: Config) -> list[str]:
    """OOD domains (data.eval_sources) whose test split cannot give this run's episodes at evaluation: no class,
    or (data.mode=fixed) fewer classes than data.ways. A training source that cannot give the training episodes
    is an error of the pre-flight (smat_dist/train/run_folder.py check_data), not a warning."""
    from smat_dist.data.remote import RemotePolicy
    from smat_dist.data.spec import SpecError, load_spec

    out = []
    policy = RemotePolicy.of(cfg.data)
    for i, src in enumerate(cfg.data.eval_sources):
        try:
            n = len(load_spec(src, policy).splits.get("test", []))
        except (SpecError, OSError):
            continue   # smat-eval reports an unreadable source as its error
        where = f"data.eval_sources[{i}]={src}: split 'test'"
        if n == 0:
            out.append(f"{where} has no class: smat-eval of this run will find nothing to test there")
        elif cfg.data.mode == EpisodeMode.fixed and n < cfg.data.ways:
            out.append(f"{where} has {n} classes, fewer than data.ways={cfg.data.ways}: evaluating this run there "
                       f"needs data.ways<={n}")
    return out


def run_warnings(cfg: Config, data: bool = True) -> list[str]:
    return schedule_warnings(cfg) + (data_warnings(cfg) if data else [])
