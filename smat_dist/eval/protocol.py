"""The meta-test protocol: fixed test episodes per domain, per-domain learning rates chosen on validation
episodes, every (method, mode) on every episode, episodes split over ranks and gathered in index order.

Why results are identical at any world size: the episode sets are fixed (fixed_sets.EVAL_SEED), rank r takes
indices r, r+R, ..., a task's random draws come from a seed keyed by (domain, split, index) only, and the
per-episode accuracies are gathered and summarised in index order on every rank. The learning rate is chosen
on the domain's *validation* episodes (never its test episodes); a domain with no usable validation split
(e.g. an OOD set converted with test classes only) takes the lr that is best on the pooled validation
episodes of the domains that have one, and results.json records which rule chose it.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from smat_dist.config.schema import Config, EvalConfig
from smat_dist.data.episodes import EpisodeConfig, episode_config  # noqa: F401 (re-exported)
from smat_dist.data.fixed_sets import EVAL_SEED, fixed_episodes
from smat_dist.data.remote import RemotePolicy
from smat_dist.data.spec import SpecError, load_spec
from smat_dist.eval.finetune import LoraRunner, finetune_full, task_theta
from smat_dist.eval.stats import average, domain_summary
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

MODES = ("zeroshot", "full", "lora")
METHODS = ("smat", "pretrained", "pmf")


@dataclass(frozen=True)
class Domain:
    name: str      # the dataset's spec name (what results are keyed by)
    source: str    # its folder or URL
    kind: str      # "id" or "ood"


def domains_from_config(cfg: Config) -> list[Domain]:
    policy = RemotePolicy.of(cfg.data)
    out = [Domain(load_spec(s, policy).name, s, "id") for s in cfg.data.sources]
    out += [Domain(load_spec(s, policy).name, s, "ood") for s in cfg.data.eval_sources]
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"data.sources + data.eval_sources name dataset(s) {dup} more than once")
    if not out:
        raise ValueError("nothing to evaluate: data.sources and data.eval_sources are both empty")
    return out


def task_seed(domain: str, split: str, index: int) -> int:
    """Seed of a task's random draws: the same for every method, mode, rank and world size."""
    h = hashlib.sha256(f"{EVAL_SEED}|{domain}|{split}|{index}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def check_eval_config(cfg: EvalConfig) -> None:
    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        raise ValueError(f"eval.modes contains {bad}; known modes: {list(MODES)}")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ValueError(f"eval.methods contains {bad}; known methods: {list(METHODS)}")
    if cfg.episodes < 1:
        raise ValueError(f"eval.episodes must be >= 1, got {cfg.episodes}")
    if any(m != "zeroshot" for m in cfg.modes):
        if not cfg.lr_grid or any(not (lr > 0) for lr in cfg.lr_grid):
            raise ValueError(f"eval.lr_grid must be a non-empty list of positive learning rates, got {cfg.lr_grid}")
        if cfg.val_episodes < 1 or cfg.finetune_steps < 1:
            raise ValueError(f"fine-tuning modes need eval.val_episodes >= 1 and eval.finetune_steps >= 1, got "
                             f"{cfg.val_episodes} and {cfg.finetune_steps}")


class Evaluator:
    """One method's task-level evaluation. Use as a context manager: SMAT's eval masks are built once."""

    def __init__(self, setup, cfg: EvalConfig):
        self.setup, self.cfg = setup, cfg
        self.kind = setup.kind
        self.device = _device_of(setup)
        self.scale = float(setup.method.cfg.logit_scale)
        self._lora: LoraRunner | None = None

    def __enter__(self):
        if self.kind == "smat":
            self.setup.pool.begin_step(train=False)
        return self

    def __exit__(self, *exc):
        if self.kind == "smat":
            self.setup.pool.end_eval()
        return False

    def lora(self) -> LoraRunner:
        if self._lora is None:
            self._lora = LoraRunner(self.setup.fb, self.cfg.lora_rank, self.cfg.lora_alpha)
        return self._lora

    def logits(self, ep, mode: str, lr: float | None, seed: int) -> torch.Tensor:
        ep = _episode_to(ep, self.device)
        if mode == "zeroshot":
            return self.setup.method.predict(ep, self.setup.pool)
        # manual_seed seeds the CUDA generators too (LoRA's dropout runs there): fork them with the CPU's
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            theta = task_theta(self.setup, ep)
            if mode == "full":
                return finetune_full(self.setup.fb, theta, ep, lr, self.cfg.finetune_steps, self.scale).logits
            if mode == "lora":
                return self.lora().adapt(theta, ep, lr, self.cfg.finetune_steps, self.scale).logits
        raise ValueError(f"unknown eval mode {mode!r}; known: {list(MODES)}")

    def accuracy(self, ep, mode: str, lr: float | None, seed: int) -> float:
        logits = self.logits(ep, mode, lr, seed)
        return float((logits.argmax(-1) == ep.query_labels.to(logits.device)).double().mean())


def _device_of(setup) -> torch.device:
    """Where a loaded method computes (its frozen backbone's tensors)."""
    return setup.fb.theta_pre.device


def _episode_to(ep, dev: torch.device):
    from dataclasses import replace

    return replace(ep, support=ep.support.to(dev), query=ep.query.to(dev),
                   support_labels=ep.support_labels.to(dev), query_labels=ep.query_labels.to(dev))


def _world() -> tuple[int, int]:
    from smat_dist.utils.ranks import rank_world

    return rank_world() if dist.is_available() and dist.is_initialized() else (0, 1)


def gather_indexed(local: dict[int, dict], n: int) -> list[dict]:
    """Merge every rank's {episode index: record} into one list in index order (the same on every rank)."""
    parts = [local]
    rank, world = _world()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    merged: dict[int, dict] = {}
    for p in parts:
        merged.update(p)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"episodes {missing[:5]} were evaluated by no rank (world size {world})")
    return [merged[i] for i in range(n)]


def _run_episodes(episodes, split: str, domain: str, jobs, workers: int) -> list[dict]:
    """jobs: {key: (evaluator, mode, lr)} -> per episode {key: accuracy}, episodes split across ranks."""
    rank, world = _world()
    local: dict[int, dict] = {}
    t0 = time.time()
    ep = None
    for ep in episodes.loader(workers=workers, rank=rank, world=world):
        seed = task_seed(domain, split, ep.index)
        local[ep.index] = {key: ev.accuracy(ep, mode, lr, seed) for key, (ev, mode, lr) in jobs.items()}
        done = len(local)
        if done == 1 or done % 50 == 0 or done == len(range(rank, len(episodes), world)):
            from smat_dist.utils.progress import rate_eta
            mine, el = len(range(rank, len(episodes), world)), time.time() - t0
            log.info("%s/%s: %d/%d episodes on this rank (%.1f s, %s)", domain, split, done, mine, el,
                     rate_eta(done, mine, el, "episodes"))
    # A sharded pool's merge is a collective: every rank runs as many episodes as the busiest one, repeating
    # one whose result is dropped (rank r holds indices r, r+R, ..., so counts differ by at most one).
    for _ in range(len(local), -(-len(episodes) // world)):
        if ep is None:
            ep = episodes[0]
        for ev, mode, lr in jobs.values():
            ev.accuracy(ep, mode, lr, task_seed(domain, split, ep.index))
    return gather_indexed(local, len(episodes))


def _val_set(domain: Domain, cfg: EvalConfig, ep_cfg: EpisodeConfig):
    try:
        fe = fixed_episodes(domain.source, "val", cfg.val_episodes, cfg=ep_cfg)
        fe.descriptions  # noqa: B018 - composes every episode now, so a too-small split fails here
        return fe
    except (SpecError, ValueError) as e:
        log.warning("domain %s has no usable validation split (%s): its learning rate will be chosen on the "
                    "pooled validation episodes of the other domains", domain.name, e)
        return None


@dataclass
class LrChoice:
    lr: float
    source: str                        # "val" (this domain) or "pooled-val"
    scores: dict[float, float] = field(default_factory=dict)


def choose_lrs(evaluators: dict, modes: list[str], domains: list[Domain], cfg: EvalConfig, ep_cfg: EpisodeConfig,
               workers: int = 0) -> dict[tuple[str, str, str], LrChoice]:
    """(method, mode, domain) -> the lr of cfg.lr_grid with the best mean query accuracy on that domain's
    validation episodes (ties: the smaller lr, the more conservative change)."""
    ft_modes = [m for m in modes if m != "zeroshot"]
    grid = sorted(float(x) for x in cfg.lr_grid)
    if not ft_modes:
        return {}
    scores: dict[str, dict[tuple[str, str], dict[float, float]]] = {}
    for d in domains:
        val = _val_set(d, cfg, ep_cfg)
        if val is None:
            continue
        jobs = {(meth, mode, lr): (ev, mode, lr) for meth, ev in evaluators.items() for mode in ft_modes for lr in grid}
        recs = _run_episodes(val, "val", d.name, jobs, workers)
        scores[d.name] = {(meth, mode): {lr: sum(r[(meth, mode, lr)] for r in recs) / len(recs) for lr in grid}
                          for meth in evaluators for mode in ft_modes}
    if not scores:
        raise ValueError(f"fine-tuning modes {ft_modes} need validation episodes, but none of the domains "
                         f"{[d.name for d in domains]} has a usable 'val' split")

    def best(s: dict[float, float]) -> float:
        return max(grid, key=lambda lr: (s[lr], -lr))

    out = {}
    for meth in evaluators:
        for mode in ft_modes:
            pooled = {lr: sum(scores[n][(meth, mode)][lr] for n in scores) / len(scores) for lr in grid}
            for d in domains:
                if d.name in scores:
                    s = scores[d.name][(meth, mode)]
                    out[(meth, mode, d.name)] = LrChoice(best(s), "val", s)
                else:
                    out[(meth, mode, d.name)] = LrChoice(best(pooled), "pooled-val", pooled)
    return out


def evaluate(setups: dict, domains: list[Domain], cfg: EvalConfig, ep_cfg: EpisodeConfig, workers: int = 0
             ) -> tuple[dict, dict]:
    """Meta-test every method of `setups` ({name: LocalSetup}) in every mode of cfg.modes on every domain.

    Returns (results, per_episode): results holds, per method and mode, each domain's mean accuracy, 95% CI,
    episode count and chosen lr, plus the ID and OOD averages; per_episode holds the accuracies themselves.
    """
    check_eval_config(cfg)
    modes = list(cfg.modes)
    unknown = [m for m in setups if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    _, world = _world()
    evaluators = {name: Evaluator(s, cfg) for name, s in setups.items()}
    for ev in evaluators.values():
        ev.__enter__()
    try:
        lrs = choose_lrs(evaluators, modes, domains, cfg, ep_cfg, workers)
        per_episode: dict = {m: {mode: {} for mode in modes} for m in setups}
        for d in domains:
            test = fixed_episodes(d.source, "test", cfg.episodes, cfg=ep_cfg)
            jobs = {(meth, mode): (ev, mode, lrs[(meth, mode, d.name)].lr if mode != "zeroshot" else None)
                    for meth, ev in evaluators.items() for mode in modes}
            recs = _run_episodes(test, "test", d.name, jobs, workers)
            for meth, mode in jobs:
                per_episode[meth][mode][d.name] = [r[(meth, mode)] for r in recs]
    finally:
        for ev in evaluators.values():
            ev.__exit__(None, None, None)
    results: dict = {}
    for meth in setups:
        results[meth] = {}
        for mode in modes:
            doms = {}
            for d in domains:
                s = domain_summary(per_episode[meth][mode][d.name])
                s["kind"] = d.kind
                if mode != "zeroshot":
                    c = lrs[(meth, mode, d.name)]
                    s.update(lr=c.lr, lr_source=c.source, val_scores={repr(k): v for k, v in c.scores.items()})
                doms[d.name] = s
            results[meth][mode] = {
                "domains": doms,
                "id_avg": average(v["mean"] for v in doms.values() if v["kind"] == "id"),
                "ood_avg": average(v["mean"] for v in doms.values() if v["kind"] == "ood"),
            }
    meta = {"methods": list(setups), "modes": modes, "domains": [vars(d) for d in domains],
            "episodes": cfg.episodes, "val_episodes": cfg.val_episodes, "finetune_steps": cfg.finetune_steps,
            "lr_grid": list(cfg.lr_grid), "eval_seed": EVAL_SEED, "world_size": world,
            "episode_config": {k: getattr(ep_cfg, k) for k in ep_cfg.__dataclass_fields__}}
    return {"meta": meta, "results": results}, per_episode
