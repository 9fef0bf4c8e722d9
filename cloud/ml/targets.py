"""The parent teacher moved by the knowledge, as a module: p*(x) for any input, not only the transfer set.

The RD update's soft targets (rd_update.soft_targets) are a closed form of the parent teacher, the
parent student's head and the knowledge. Evaluated as a torch module they also give targets for the
shifted, noisy copies that training draws on the fly, so the updated teacher and the re-KD student
learn the user's difference in the neighbourhood of every transfer sample, not only on the samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cloud.ml.nets import EdgeStudent
from cloud.ml.rd_update import Knowledge, RDConfig


class KnowledgeTargets(nn.Module):
    """Logits whose softmax is p*(x): the teacher's belief, corrected by the head deltas at input level
    and moved through the preference map at class level, where that moves it by more than θ.

    Moved inputs get τ·log p*, so that a consumer distilling at temperature `tau` learns p* itself
    (softening a target that is already a probability would flatten the user's decision); unmoved
    inputs get the teacher's logits, softened by the consumer as in any KD. With an `anchor` (the
    parent student), inputs the knowledge does not move and whose top-1 by `anchor_by` (the parent
    teacher, whose beliefs the knowledge moved; by default `teacher`) is none of `anchored_classes`
    take the anchor's logits instead (with `anchor_map`, the anchor's belief pushed through that
    preference map, so the parent's doubts towards a class the user relabelled follow the user):
    a student trained on these targets keeps the parent's decisions on the classes the knowledge
    leaves alone.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: EdgeStudent,
        knowledge: Knowledge,
        config: RDConfig,
        *,
        anchor: nn.Module | None = None,
        anchored_classes: set[int] | None = None,
        anchor_by: nn.Module | None = None,
        anchor_map: npt.NDArray[np.float32] | None = None,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        self.teacher, self.student, self.anchor = teacher, student, anchor
        self.anchor_by = anchor_by or teacher
        self.anchor_map = None if anchor_map is None else torch.from_numpy(anchor_map)
        self.preference = torch.from_numpy(knowledge.preference)
        self.support = torch.from_numpy(knowledge.support)
        deltas = knowledge.deltas if config.delta_weight > 0 else []
        self.delta_w = torch.stack([torch.from_numpy(dw) for dw, _ in deltas]) if deltas else torch.zeros(0)
        self.delta_b = torch.stack([torch.from_numpy(db) for _, db in deltas]) if deltas else torch.zeros(0)
        classes = knowledge.class_of_output  # output k's belief goes to class classes[k]
        self.pool = None if classes is None else torch.eye(len(classes))[torch.from_numpy(classes)]
        self.free = torch.ones(knowledge.preference.shape[0], dtype=torch.bool)
        for c in anchored_classes or ():
            self.free[c] = False
        self.config = config
        self.tau = tau

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher(x)  # once: the teacher's forward is most of a training step
        p_t = F.softmax(teacher_logits, dim=1)
        p_in = p_t
        if len(self.delta_w):
            feats = self.student.features(x)
            w, b = self.student.head.weight, self.student.head.bias
            p_s = F.softmax(feats @ w.T + b, dim=1)
            moved_heads = torch.einsum("nd,kcd->knc", feats, w + self.delta_w) + (b + self.delta_b)[:, None]
            diffs = F.softmax(moved_heads, dim=2) - p_s
            # the same combination as rd_update: median from three deltas, mean below
            diff = diffs.median(dim=0).values if len(diffs) >= 3 else diffs.mean(dim=0)
            if self.pool is not None:  # the base model's outputs pooled into the classes they stand for
                diff = diff @ self.pool
            own = p_t.argmax(dim=1)  # as rd_update: a delta adds belief only along the evidence
            towards = self.support[own] | (torch.arange(p_t.shape[1]) == own[:, None])
            diff = torch.where(towards | (diff < 0), diff, torch.zeros_like(diff))
            p_in = (p_t + self.config.delta_weight * diff).clamp_min(0.0)
            p_in = p_in / p_in.sum(dim=1, keepdim=True).clamp_min(1e-12)
        p = p_in @ self.preference
        before, after = p_t.argmax(dim=1), p.argmax(dim=1)
        supported = (before == after) | self.support[before, after]
        moved = ((p - p_t).abs().sum(dim=1) > self.config.theta) & supported
        if self.config.target_temperature != 1.0:
            p = p.clamp_min(1e-12) ** (1.0 / self.config.target_temperature)
            p = p / p.sum(dim=1, keepdim=True)
        logits = torch.where(moved[:, None], self.tau * torch.log(p.clamp_min(1e-12)), teacher_logits)
        if self.anchor is not None:
            decided = p_t if self.anchor_by is self.teacher else F.softmax(self.anchor_by(x), dim=1)
            keep = ~moved & self.free[decided.argmax(dim=1)]
            anchored = self.anchor(x)
            if self.anchor_map is not None:  # the parent's belief moved by the knowledge, as p* is
                anchored = torch.log((F.softmax(anchored, dim=1) @ self.anchor_map).clamp_min(1e-12))
            logits = torch.where(keep[:, None], anchored, logits)
        return logits
