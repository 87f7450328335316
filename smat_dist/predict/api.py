"""Few-shot prediction on one's own images from an export, for notebooks and for smat-predict.

  from smat_dist.predict.api import Predictor
  p = Predictor.load("runs/demo/smat.export")        # once
  task = p.adapt("my_support/", finetune="lora")      # one folder per class; None = zero-shot
  res = task.predict(["q1.jpg", "queries/"])           # or PIL images
  res.records                                          # [{"file", "class", "probability", "top"}, ...]

A task is evaluated exactly as smat-eval evaluates an episode (the same Evaluator: SMAT's eval-mode merge
for the task's support set, then zero-shot, full fine-tuning or LoRA with the fine-tuning draws seeded by
`seed`), so the same images give the same probabilities smat-eval's logits give. Fine-tuning runs on the
support set only; each `predict` call adapts again from the same seed (the same result every call).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from smat_dist.data.episodes import Episode
from smat_dist.data.transforms import eval_transform, normalize_batch
from smat_dist.predict.images import LoadedImage, PredictError, read_queries, read_support

MODES = {None: "zeroshot", "none": "zeroshot", "full": "full", "lora": "lora"}


@dataclass
class Prediction:
    classes: list[str]
    files: list[str]
    probs: torch.Tensor                     # [queries, ways]
    expert_weights: list[float]             # SMAT's merging weights for this support set ([] otherwise)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    queries: list[LoadedImage] = field(default_factory=list)

    def top(self, i: int, k: int = 3) -> list[tuple[str, float]]:
        p, idx = self.probs[i].topk(min(k, len(self.classes)))
        return [(self.classes[j], float(v)) for v, j in zip(p.tolist(), idx.tolist())]

    @property
    def records(self) -> list[dict]:
        return [{"file": f, "class": self.top(i, 1)[0][0], "probability": self.top(i, 1)[0][1],
                 "top": [[c, p] for c, p in self.top(i)]} for i, f in enumerate(self.files)]


class Task:
    """A support set the model is adapted to (`Predictor.adapt`)."""

    def __init__(self, predictor: "Predictor", classes: list[str], support: list[list[LoadedImage]], mode: str,
                 lr: float | None, steps: int, seed: int):
        self.p, self.classes, self.support, self.mode = predictor, classes, support, mode
        self.lr, self.steps, self.seed = lr, steps, seed
        self.xs = normalize_batch([im.pixels for imgs in support for im in imgs], predictor.size)
        self.ys = torch.tensor([c for c, imgs in enumerate(support) for _ in imgs], dtype=torch.long)
        self.expert_weights = predictor.expert_weights(self.xs, self.ys, len(classes))

    def predict(self, queries, skip_bad: bool = False) -> Prediction:
        """Queries: paths of files or folders, or PIL images (a list, or one)."""
        if not isinstance(queries, (list, tuple)):
            queries = [queries]
        paths = [q for q in queries if isinstance(q, (str, Path))]
        images = [LoadedImage(Path(f"image{i}"), eval_transform(q.convert("RGB"), self.p.size))
                  for i, q in enumerate(queries) if not isinstance(q, (str, Path))]
        skipped: list = []
        if paths:
            loaded, skipped = read_queries(paths, self.p.size, skip_bad)
            images = loaded + images
        xq = normalize_batch([im.pixels for im in images], self.p.size)
        ep = Episode(self.xs, self.ys, xq, torch.zeros(len(images), dtype=torch.long), "predict", "predict", 0,
                     len(self.classes), self.classes)
        logits = self.p.logits(ep, self.mode, self.lr, self.steps, self.seed)
        return Prediction(self.classes, [str(im.path) for im in images], torch.softmax(logits.float(), -1),
                          self.expert_weights, skipped, images)


class Predictor:
    """An exported model (smat-export), loaded once."""

    def __init__(self, setup, cfg, path: str):
        self.setup, self.cfg, self.path = setup, cfg, path
        self.size = int(cfg.model.image_size)

    @classmethod
    def load(cls, path: str, device: torch.device | None = None) -> "Predictor":
        from smat_dist.config.hydra import load_yaml
        from smat_dist.export.layout import CONFIG
        from smat_dist.export.loader import load_export

        setup = load_export(path, device=device)
        return cls(setup, load_yaml(Path(path) / CONFIG), path)

    @property
    def kind(self) -> str:
        return self.setup.kind

    def adapt(self, support, finetune: str | None = None, lr: float | None = None, steps: int | None = None,
              seed: int = 0) -> Task:
        """support: a folder of class folders, or {class name: [image paths]}. finetune: None (zero-shot),
        "full" or "lora", at learning rate `lr` (default: the middle of the run's eval.lr_grid) for `steps`
        (default eval.finetune_steps)."""
        if finetune not in MODES:
            raise PredictError(f"finetune={finetune!r}: expected one of none, full, lora")
        mode = MODES[finetune]
        if isinstance(support, dict):
            from smat_dist.predict.images import load_image

            if len(support) < 2:
                raise PredictError(f"support has {len(support)} class(es); a few-shot task needs at least 2")
            empty = [c for c, files in support.items() if not files]
            if empty:
                raise PredictError(f"support class {empty[0]!r} has no images")
            classes = list(support)
            images = [[load_image(Path(f), self.size) for f in support[c]] for c in classes]
        else:
            classes, images = read_support(support, self.size)
        grid = sorted(self.cfg.eval.lr_grid)
        lr = float(lr if lr is not None else grid[len(grid) // 2])
        steps = int(steps if steps is not None else self.cfg.eval.finetune_steps)
        return Task(self, classes, images, mode, lr if mode != "zeroshot" else None, steps, seed)

    def logits(self, ep: Episode, mode: str, lr: float | None, steps: int, seed: int) -> torch.Tensor:
        """smat-eval's logits for the episode (the same Evaluator, the same seeded fine-tuning)."""
        import copy

        from smat_dist.eval.protocol import Evaluator

        ecfg = copy.copy(self.cfg.eval)
        ecfg.finetune_steps = steps
        dev = self.setup.fb.theta_pre.device
        ep = Episode(ep.support.to(dev), ep.support_labels.to(dev), ep.query.to(dev), ep.query_labels.to(dev),
                     ep.source, ep.split, ep.index, ep.ways, ep.class_names)
        with Evaluator(self.setup, ecfg) as ev:
            return ev.logits(ep, mode, lr, seed).detach().cpu()

    @torch.no_grad()
    def expert_weights(self, xs: torch.Tensor, ys: torch.Tensor, ways: int) -> list[float]:
        """SMAT's merging weights for this support set (the hypernetwork's eval-mode output)."""
        if self.kind != "smat":
            return []
        from smat_dist.method.protonet import prototypes

        fb = self.setup.fb
        xs = xs.to(fb.theta_pre.device)
        w, _ = self.setup.method(prototypes(fb(fb.theta_pre, xs), ys.to(xs.device), ways), False)
        return [float(v) for v in w.flatten().tolist()]
