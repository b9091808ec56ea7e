"""The distillation task: the pretraining loop's TrainTask with a frozen teacher beside the student.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

over the scored positions (targets != -100). The T^2 factor keeps the soft term's gradients on the
scale of the hard term's as T changes (Hinton et al., 2015). The student is what the loop trains,
checkpoints and consolidates (a plain Transformer, so every strategy works unchanged); the teacher is
loaded on each worker by `build_model`, kept on the task (never pickled, never in a checkpoint), in
eval mode without gradients, and moved to the student's device on first use.

Validation (the loop's `val/loss`, `val/ppl`) is the student's plain next-token loss, so it compares
with pretraining runs; the KL to the teacher on held-out data is reported by the stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.components.pretrain.task import Batch, TrainTask

if TYPE_CHECKING:
    from lmforge.components.pretrain.config import PretrainConfig
    from lmforge.model.config import ModelConfig

IGNORE_INDEX = -100


def distill_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher || student) at `temperature`, mean over scored positions; hard-label cross-entropy).

    Logits (B, T, V), targets (B, T). Computed in fp32."""
    scored = targets != IGNORE_INDEX  # (B, T)
    s = student_logits.float()[scored] / temperature  # (N, V)
    t = teacher_logits.float()[scored] / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    hard = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return kl, hard


class DistillTask(TrainTask):
    name = "distill"

    def __init__(self, teacher_dir: str, alpha: float, temperature: float) -> None:
        self.teacher_dir, self.alpha, self.temperature = teacher_dir, alpha, temperature
        self._teacher: nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:  # travels to Ray workers without the teacher's weights
        return {**self.__dict__, "_teacher": None}

    def teacher(self, device: torch.device) -> nn.Module:
        if self._teacher is None:
            from lmforge.model.checkpoint import load_model_dir

            self._teacher = load_model_dir(self.teacher_dir, dtype=torch.float32).requires_grad_(False).eval()
        if next(self._teacher.parameters()).device != device:
            self._teacher.to(device)
        return self._teacher

    def build_model(self, cfg: PretrainConfig, model_cfg: ModelConfig) -> nn.Module:
        self.teacher(torch.device("cpu"))  # load now: a bad teacher fails before the first step
        return super().build_model(cfg, model_cfg)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        logits = model(inputs)  # (B, T, V): the soft term needs the student's whole distribution
        if not model.training:  # validation: the student's own next-token loss
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs.device)(inputs)
        kl, hard = distill_terms(logits, teacher_logits, targets, self.temperature)
        return self.alpha * self.temperature**2 * kl + (1 - self.alpha) * hard
