"""Meta-test adaptation of one task: zero-shot, full fine-tuning (P>M>F recipe) and LoRA (peft).

All three start from the task's dense weights theta_i: SMAT's eval-mode merge theta_pre + (sum_m w_m z_m) * delta,
P>M>F's theta_pre + delta, or theta_pre for the pre-trained baseline. Fine-tuning recipe (P>M>F deploy.py,
as used by SMAT): each step recomputes the prototypes with gradient from the clean support set, classifies an
augmented copy of the support set (DiffAugment colour + translation, random flip, applied with probability 0.9)
with 10 * cos logits, and takes an AdamW step on the cross-entropy. The query set is never seen.

Every random draw of a task (augmentation, LoRA init, LoRA dropout) comes from the global torch RNG seeded by
the caller per episode inside `torch.random.fork_rng`, so a task's result does not depend on which rank runs it.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.method.protonet import cosine_logits, prototypes
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

AUG_PROB = 0.9          # P>M>F / SMAT: DiffAugment applied to the support batch with this probability
TRANSLATE_RATIO = 0.125  # DiffAugment's translation: up to 1/8 of the image side
LORA_DROPOUT = 0.1
LORA_LR_MULT = 10.0      # LoRA runs at 10x the searched learning rate (upstream)
# timm ViT attention: fused qkv (ViT, DINO/v2/v3, SigLIP) or q/k/v (EVA-02 B/L) and the output projection
LORA_TARGETS = r".*\.attn\.(qkv|q_proj|k_proj|v_proj|proj)"


# ---------------------------------------------------------------- augmentation (DiffAugment colour+translation)

# The random draws come from the host generator (seeded per episode) and move to the images' device: the same
# numbers on CPU and GPU, so an episode's augmentation does not depend on where it runs.
def _host_rand(*shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(*shape).to(like.device)


def _colour(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (_host_rand(n, 1, 1, 1, like=x) - 0.5)                       # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_host_rand(n, 1, 1, 1, like=x) * 2) + mean          # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_host_rand(n, 1, 1, 1, like=x) + 0.5) + mean     # contrast


def _translate(x: torch.Tensor, ratio: float = TRANSLATE_RATIO) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (n, 1, 1)).to(x.device)
    tx = torch.randint(-sw, sw + 1, (n, 1, 1)).to(x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy.unsqueeze(0) + ty + 1, 0, h + 1)
    gx = torch.clamp(gx.unsqueeze(0) + tx + 1, 0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)               # zero border: shifted-in pixels are 0
    return xp[torch.arange(n, device=x.device).view(n, 1, 1), gy, gx].permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, prob: float = AUG_PROB) -> torch.Tensor:
    """DiffAugment('color,translation') with probability `prob` for the batch, then a random flip per image."""
    if torch.rand(()) < prob:
        x = _translate(_colour(x))
    flip = _host_rand(x.shape[0], like=x) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


# ---------------------------------------------------------------- the task's dense starting weights

@torch.no_grad()
def task_theta(setup, ep) -> torch.Tensor:
    """theta_i of the task (detached), as the method defines it. For SMAT the caller has run
    `setup.pool.begin_step(train=False)`."""
    return setup.method.task_theta(ep, setup.pool)


# ---------------------------------------------------------------- the shared loss and prediction

def _proto_loss(embed, xs, ys, ways, scale, aug: bool) -> torch.Tensor:
    protos = prototypes(embed(xs), ys, ways)
    x_in = augment(xs) if aug else xs
    return F.cross_entropy(cosine_logits(embed(x_in), protos, scale), ys)


@torch.no_grad()
def _predict(embed, ep, scale) -> torch.Tensor:
    protos = prototypes(embed(ep.support), ep.support_labels, int(ep.ways))
    return cosine_logits(embed(ep.query), protos, scale)


@torch.no_grad()
def support_loss(embed, ep, scale: float = 10.0) -> float:
    """Clean-support cross-entropy against the support prototypes: how well a model fits the support set."""
    return float(_proto_loss(embed, ep.support, ep.support_labels, int(ep.ways), scale, aug=False))


@dataclass
class Adapted:
    logits: torch.Tensor         # query logits after adaptation
    support_loss_before: float
    support_loss_after: float


# ---------------------------------------------------------------- full fine-tuning

def finetune_full(fb, theta0: torch.Tensor, ep, lr: float, steps: int, scale: float = 10.0) -> Adapted:
    """AdamW (torch default weight decay 0.01, as upstream) on every weight of the dense task model."""
    theta = theta0.detach().clone().requires_grad_(True)
    embed = lambda x: fb(theta, x)  # noqa: E731
    before = support_loss(embed, ep, scale)
    opt = torch.optim.AdamW([theta], lr=lr)
    ys, ways = ep.support_labels, int(ep.ways)
    for _ in range(steps):
        loss = _proto_loss(embed, ep.support, ys, ways, scale, aug=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return Adapted(_predict(embed, ep, scale), before, support_loss(embed, ep, scale))


# ---------------------------------------------------------------- LoRA through peft

def lora_targets(model: nn.Module) -> tuple[list[str], str]:
    """The layers LoRA adapts, and their kind: a ViT's attention Linear layers (qkv/proj), else, for a CNN,
    every dense nn.Conv2d (peft's Conv2d LoRA: A a conv with the layer's kernel and stride into r channels, B a
    1x1 conv back). Grouped / depthwise convs are left out: peft's Conv2d LoRA builds a dense A over all input
    channels, not a low-rank update of a per-group kernel; and Conv2d subclasses with their own padding
    (timm's Conv2dSame, TF-'same' models) are left out because A would not pad as the layer does."""
    attn = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(LORA_TARGETS, n)]
    if attn:
        return attn, "attention"
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1]
    if convs:
        return convs, "conv"
    raise ValueError(f"eval mode 'lora' needs a timm ViT with attention qkv/proj Linear layers or a CNN with "
                     f"dense Conv2d layers; backbone {type(model).__name__} has neither")


class LoraRunner:
    """A private copy of the backbone with LoRA adapters on its attention qkv/proj layers (ViTs) or on its
    dense Conv2d layers (CNNs, see `lora_targets`).

    Per task the copy's base weights are overwritten with theta_i and the adapters are re-initialised (A:
    kaiming-uniform as peft, B: zero, so the adapted model starts exactly at theta_i); nothing carries over
    between tasks, and the caller's backbone is never touched. BatchNorm stays in eval mode (running
    statistics) as in the rest of the method.
    """

    def __init__(self, fb, rank: int = 8, alpha: int = 32, dropout: float = LORA_DROPOUT):
        from peft import LoraConfig, get_peft_model

        self.fb = fb
        base = copy.deepcopy(fb.model)
        targets, self.kind = lora_targets(base)
        self._base_params = dict(base.named_parameters())  # the same Parameter objects survive the peft wrap
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                         target_modules=LORA_TARGETS if self.kind == "attention" else targets)
        self.model = get_peft_model(base, cfg)
        self.model.eval()
        self.lora_params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        self._dropouts = [m for n, m in self.model.named_modules() if n.endswith("lora_dropout")]
        log.info("LoRA on %d %s layers (%d trainable parameters)", len(targets), self.kind,
                 sum(p.numel() for p in self.lora_params))

    @torch.no_grad()
    def _reset(self, theta: torch.Tensor) -> None:
        for name, t in self.fb.space.unflatten(theta).items():
            self._base_params[name].copy_(t)
        for n, p in self.model.named_parameters():
            if "lora_A" in n:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            elif "lora_B" in n:
                p.zero_()

    def _train_dropout(self, on: bool) -> None:
        # Only the adapters' dropout switches mode: the backbone stays in eval (BatchNorm stats, no drop-path).
        for m in self._dropouts:
            m.train(on)

    def adapt(self, theta0: torch.Tensor, ep, lr: float, steps: int, scale: float = 10.0) -> Adapted:
        self._reset(theta0)
        embed = self.model
        before = support_loss(embed, ep, scale)
        opt = torch.optim.AdamW(self.lora_params, lr=lr * LORA_LR_MULT)
        ys, ways = ep.support_labels, int(ep.ways)
        self._train_dropout(True)
        try:
            for _ in range(steps):
                loss = _proto_loss(embed, ep.support, ys, ways, scale, aug=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            self._train_dropout(False)
        return Adapted(_predict(embed, ep, scale), before, support_loss(embed, ep, scale))
