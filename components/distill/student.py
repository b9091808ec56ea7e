"""A student built from the teacher: the same architecture with fewer layers, initialised from evenly
spaced teacher layers (as DistilBERT took every other layer), plus the teacher's embedding, final norm
and output head. Starting from the teacher's own features, the student needs far fewer steps than from
a random initialisation to get close."""

from __future__ import annotations

import dataclasses
import math

import torch

from lmforge.model.transformer import Transformer


def resolve_layers(spec: int | str, teacher_layers: int) -> int:
    n = math.ceil(teacher_layers / 2) if spec == "half" else int(spec)
    return n


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced, first and last included: 8 -> 4 gives [0, 2, 5, 7]; 1 student layer takes layer 0."""
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


@torch.no_grad()
def student_from_teacher(teacher: Transformer, n_layers: int) -> Transformer:
    cfg = dataclasses.replace(teacher.config, n_layers=n_layers)
    student = Transformer(cfg)
    picks = teacher_layer_indices(teacher.config.n_layers, n_layers)
    state = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("model.layers."):
            continue
        state[name] = value
    for i, j in enumerate(picks):
        for name, value in teacher.model.layers[j].state_dict().items():
            state[f"model.layers.{i}.{name}"] = value
    student.load_state_dict(state)
    return student
