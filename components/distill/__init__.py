"""Distillation stage: train a smaller student on token shards to match a frozen teacher.

config.py   DistillConfig = the pretraining config + a `distill` section (teacher, alpha, temperature,
            student built from the teacher's layers)
task.py     DistillTask: the pretraining loop's TrainTask with the frozen teacher beside the student and
            loss alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy on the labels
student.py  a student with fewer layers initialised from evenly spaced teacher layers
stage.py    distill(config) -> DistillResult: the pretraining stage with the task, plus KL / loss
            to the teacher on held-out shards before and after
"""

from lmforge.components.distill.config import DistillConfig, DistillSection
from lmforge.components.distill.stage import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "DistillSection", "distill"]
