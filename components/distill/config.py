"""The distillation config: the pretraining config (student architecture in `model`, data, optimizer,
schedule, strategy, checkpoints, tracking, Ray) plus a `distill` section.

The student is, in order of precedence:
  distill.student_layers = N | "half"  the teacher's architecture with N (or ceil(L/2)) layers,
                                       initialised from evenly spaced teacher layers (embedding, final
                                       norm and head copied too); written to <output_dir>/student-init
  model.init_from = DIR                an existing model directory (its vocabulary must be the teacher's)
  model.preset + model.overrides       a fresh model; its vocabulary is set to the teacher's
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.components.pretrain.config import PretrainConfig, TrackingSection
from lmforge.model.config import ConfigError

PRETRAIN_EXPERIMENT = TrackingSection().experiment


@dataclass
class DistillSection:
    teacher: str = ""  # the teacher model directory (lmforge / Hugging Face Llama layout)
    alpha: float = 0.5  # weight of the soft loss (KL to the teacher); 1 - alpha on the hard labels
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T^2 (Hinton et al.)
    student_layers: int | str | None = None  # N or "half": the student from the teacher's layers (above)
    eval_batches: int = 8  # held-out batches (of data.micro_batch_size) for the KL/loss report

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ConfigError("distill.teacher is required (--teacher DIR)")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature!r}")
        layers = self.student_layers
        if isinstance(layers, str) and layers != "half":
            raise ConfigError(f"distill.student_layers must be an integer >= 1 or 'half', got {layers!r}")
        if isinstance(layers, int) and (isinstance(layers, bool) or layers < 1):
            raise ConfigError(f"distill.student_layers must be an integer >= 1 or 'half', got {layers!r}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise ConfigError(f"distill.eval_batches must be an integer >= 0, got {self.eval_batches!r}")


@dataclass
class DistillConfig(PretrainConfig):
    output_dir: str = "out/distill"
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="lmforge-distill"))
    distill: DistillSection = field(default_factory=lambda: DistillSection(teacher="out/pretrain/model"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tracking.experiment == PRETRAIN_EXPERIMENT:  # a tracking section that left it at its default
            self.tracking.experiment = "lmforge-distill"
