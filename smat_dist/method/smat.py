"""One SMAT task: merge the experts for the task, inner step, distil, return every loss term.

Backbone passes per training task (S = support, Q = query):
  1. frozen theta_pre on S+Q, no graph: prototypes for the hypernetwork AND the frozen-model teacher's logits;
  2. theta_i on S with graph: prototypes (with grad) AND the inner step's support loss (one pass serves both);
  3. theta_i' on Q with graph: student logits;
  4. backward of CE(Q) to theta_i' only: the dense teacher's SGD step reuses pass 3's graph;
  5. teacher theta_t on Q, no graph: teacher logits;
  plus the inner-step backward through pass 2 and the outer backward through passes 2 and 3.
That is 4 forward passes (2 without graph) and 3 backward passes, against upstream's 8 forwards and 4 backwards.
In image units (a backward = 2 forwards) that is 6S + 7Q against P>M>F's 3S + 3Q, above 2x for any episode.
The opt-in top teacher (method.teacher.top_fraction = f < 1) runs passes 4 and 5 through the top blocks only:
6S + (4 + 3f)Q (method/teacher.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from smat_dist.config.schema import MethodConfig
from smat_dist.method.hypernet import HyperNetwork, task_seed
from smat_dist.method.protonet import accuracy_t, cosine_logits, prototypes
from smat_dist.method.teacher import DenseTeacher
from smat_dist.model.backbone import FunctionalBackbone
from smat_dist.utils.spans import span


@dataclass
class TaskResult:
    loss: torch.Tensor          # the task's whole loss: outer + reg
    w: torch.Tensor
    # 0-dim tensors on the task's device (or floats): the step converts them with one host sync
    metrics: dict = field(default_factory=dict)
    # the loss apart: `outer` reaches the hypernetwork only through the merge, `reg` (its regulariser) and
    # `w_live` (w with its graph) only through the hypernetwork: a pool that gives w its gradient at the step's
    # end (Pool.defers_w_grad) has the step push them through the hypernetwork then
    outer: torch.Tensor | None = None
    reg: torch.Tensor | None = None
    w_live: torch.Tensor | None = None


@dataclass
class Prelude:
    """What a task needs before its merge: the frozen features of S+Q and the merging weights (with graph)."""
    f_pre: torch.Tensor
    p_pre: torch.Tensor
    w: torch.Tensor
    a: torch.Tensor


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_student || p_teacher) at temperature t, batch mean (upstream's mode-seeking direction)."""
    ls, lt = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()


def _episode_tensors(ep):
    return ep.support, ep.support_labels, ep.query, ep.query_labels, int(ep.ways)


class SMAT(nn.Module):
    """The trainable, replicated part of SMAT (the hypernetwork); the expert pool is passed in (smat_dist.pool)."""

    def __init__(self, backbone: FunctionalBackbone, cfg: MethodConfig, seed: int = 0):
        super().__init__()
        self.fb = backbone
        self.cfg = cfg
        self.seed = seed
        self.hypernet = HyperNetwork(backbone.feature_dim, cfg.experts, cfg.hypernet)
        self.teacher = DenseTeacher(backbone, cfg.teacher, cfg.logit_scale)

    def forward(self, protos: torch.Tensor, train: bool, task_index: int = 0):
        # The hypernetwork is reached through forward() so that engines that hook module calls
        # (DeepSpeed ZeRO-3 parameter gathering) see it.
        return self.hypernet(protos, train=train, task_seed=task_seed(self.seed, task_index))

    def prelude(self, ep, task_index: int, train: bool = True) -> Prelude:
        """Pass 1 and the hypernetwork: the frozen features and the task's merging weights. A step computes
        every task's prelude first, so the pool knows all the step's weights before the first merge."""
        xs, ys, xq, _, ways = _episode_tensors(ep)
        with span("frozen_pass"), torch.no_grad():
            f_pre = self.fb(self.fb.theta_pre, torch.cat([xs, xq]))
        p_pre = prototypes(f_pre[: len(xs)], ys, ways)
        with span("hypernet"):
            w, a = self(p_pre, train, task_index)
        return Prelude(f_pre=f_pre, p_pre=p_pre, w=w, a=a)

    def task(self, ep, pool, task_index: int, train: bool = True, prelude: Prelude | None = None) -> TaskResult:
        """One task; `pool` is anything with merge(w) -> merged delta (a smat_dist.pool Pool between begin/end).
        `prelude`: this task's, computed beforehand by `prelude` (else here)."""
        cfg, fb = self.cfg, self.fb
        xs, ys, xq, yq, ways = _episode_tensors(ep)
        theta_pre = fb.theta_pre
        pre = prelude if prelude is not None else self.prelude(ep, task_index, train)
        fq_pre, p_pre, w, a = pre.f_pre[len(xs):], pre.p_pre, pre.w, pre.a
        with span("merge"):
            theta = theta_pre + pool.merge(w)
        with span("support_pass"):
            fs = fb(theta, xs)
            protos = prototypes(fs, ys, ways)
        m: dict = {}
        theta1, p1 = theta, protos
        if train:
            for step in range(cfg.inner_steps):
                if step > 0:
                    with span("support_pass"):
                        fs = fb(theta1, xs)
                with span("inner_grad"):
                    head = p1.detach().requires_grad_(True)
                    ce_s = F.cross_entropy(cosine_logits(fs, head, cfg.logit_scale), ys)
                    g_theta, g_head = torch.autograd.grad(ce_s, [theta1, head], retain_graph=True)
                # First order: the step's gradient is a constant; the prototypes keep their own gradient path.
                theta1 = theta1 - cfg.inner_lr * g_theta
                p1 = p1 - cfg.inner_lr * g_head
                del g_theta   # P numbers that would otherwise live through the teacher and the outer backward
                m["loss/support_ce"] = ce_s.detach()
        tc = cfg.teacher
        teach = train and tc.enabled
        tap = self.teacher.tap() if teach else None
        with span("query_pass"):
            fq = fb(theta1, xq, tap=tap)
            logits = cosine_logits(fq, p1, cfg.logit_scale)
            ce_q = F.cross_entropy(logits, yq)
        loss = ce_q
        m["loss/query_ce"] = ce_q.detach()
        m["acc/query"] = accuracy_t(logits, yq)
        if teach:
            with span("teacher_grad"):
                t_grads = self.teacher.gradient(ce_q, theta1, p1, tap)
            with span("teacher_eval"):
                t_logits = self.teacher.logits(t_grads, theta1, p1, xq, tap)
            del tap, t_grads
            t2 = tc.temperature ** 2
            kd_dense = reverse_kl(logits, t_logits, tc.temperature)
            kd = 0.5 * t2 * kd_dense if tc.pretrained_teacher else t2 * kd_dense
            m["loss/kd_dense"] = kd_dense.detach()
            m["acc/teacher"] = accuracy_t(t_logits, yq)
            if tc.pretrained_teacher:
                pre_logits = cosine_logits(fq_pre, p_pre, cfg.logit_scale)
                kd_pre = reverse_kl(logits, pre_logits, tc.temperature)
                kd = kd + 0.5 * t2 * kd_pre
                m["loss/kd_pretrained"] = kd_pre.detach()
                m["acc/pretrained"] = accuracy_t(pre_logits, yq)
            loss = (1 - tc.lam) * ce_q + tc.lam * kd
        reg = self.hypernet.regulariser(a)
        outer, loss = loss, loss + reg
        m["loss/hyper_reg"] = reg.detach()
        m["loss/task"] = loss.detach()
        m["episode/ways"] = float(ways)
        m["episode/support"] = float(len(xs))
        m["episode/query"] = float(len(xq))
        return TaskResult(loss=loss, w=w.detach(), metrics=m, outer=outer, reg=reg, w_live=w)

    @torch.no_grad()
    def task_theta(self, ep, pool) -> torch.Tensor:
        """The task's merged dense weights theta_i (eval-mode merge; fine-tuning at meta-test starts here)."""
        f_pre = self.fb(self.fb.theta_pre, ep.support)
        w, _ = self(prototypes(f_pre, ep.support_labels, int(ep.ways)), False)
        return self.fb.theta_pre + pool.merge(w).detach()

    @torch.no_grad()
    def predict(self, ep, pool) -> torch.Tensor:
        """Zero-shot query logits: eval-mode merge (deterministic gates and weights), clean support prototypes."""
        xs, ys, xq, _, ways = _episode_tensors(ep)
        f_pre = self.fb(self.fb.theta_pre, xs)
        w, _ = self(prototypes(f_pre, ys, ways), False)
        theta = self.fb.theta_pre + pool.merge(w)
        protos = prototypes(self.fb(theta, xs), ys, ways)
        return cosine_logits(self.fb(theta, xq), protos, self.cfg.logit_scale)
