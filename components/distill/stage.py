"""The distillation stage: `distill(config) -> DistillResult`, one code path for `lmforge distill` and tests.

    preflight (teacher readable, vocabularies agree, data present) -> the student: from the teacher's
    layers (<output_dir>/student-init), a directory, or a preset -> KL(teacher || student) and losses
    on held-out shards -> the pretraining stage with DistillTask (in-process or Ray Train: strategies,
    checkpoints, --resume, MLflow all as in `lmforge pretrain`) -> the same figures for the trained student
    -> <output_dir>/distill_report.json (and a "distill" entry in the student's lmforge.json)

Output layout = `lmforge pretrain`'s: <output_dir>/{config.yaml, checkpoints/, model/, logs/, loss_curve.png}
plus student-init/ (when built from the teacher) and distill_report.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.components.distill.config import DistillConfig
from lmforge.components.distill.student import resolve_layers, student_from_teacher
from lmforge.components.distill.task import DistillTask, distill_terms
from lmforge.components.pretrain.stage import PretrainResult, absolute_paths, pretrain
from lmforge.components.token_dataset import PackedTokenDataset, read_index
from lmforge.errors import ConfigError
from lmforge.model.checkpoint import load_model_dir, read_config, save_model_dir

REPORT_FILE = "distill_report.json"
STUDENT_INIT = "student-init"


@dataclass
class DistillResult:
    run: PretrainResult  # the training run (model_dir, checkpoint_dir, metrics, mlflow_run_id, ...)
    report: dict[str, Any]  # teacher, student shapes, held-out KL / loss before and after

    @property
    def model_dir(self) -> Path | None:
        return self.run.model_dir


def distill(cfg: DistillConfig, *, resume: str | None = None, verbose: bool = False) -> DistillResult:
    """Distill as configured. `resume` as in `pretrain()`; `verbose` also prints Ray's logs."""
    cfg = absolute_paths(cfg)
    teacher_dir = str(Path(cfg.distill.teacher).expanduser().resolve())
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=teacher_dir))
    teacher_cfg = read_config(teacher_dir)  # a clear error for a missing or invalid teacher
    index = read_index(cfg.data.shards_dir)
    if int(index["vocab_size"]) > teacher_cfg.vocab_size:
        raise ConfigError(
            f"distill.teacher: the teacher's vocabulary ({teacher_cfg.vocab_size}) is smaller than the token "
            f"shards' ({index['vocab_size']}): the teacher was trained with another tokenizer"
        )
    out = Path(cfg.output_dir)

    def say(msg: str) -> None:
        print(f"[distill] {msg}", flush=True)

    if cfg.distill.student_layers is not None:
        n = resolve_layers(cfg.distill.student_layers, teacher_cfg.n_layers)
        if n >= teacher_cfg.n_layers:
            raise ConfigError(
                f"distill.student_layers={cfg.distill.student_layers} gives {n} layers; the teacher has "
                f"{teacher_cfg.n_layers}: a student must have fewer"
            )
        init = out / STUDENT_INIT
        if not (resume and (init / "config.json").is_file()):
            teacher = load_model_dir(teacher_dir, dtype=torch.float32)
            tokenizer = teacher_dir if (Path(teacher_dir) / "tokenizer.json").is_file() else None
            save_model_dir(student_from_teacher(teacher, n), init, tokenizer_dir=tokenizer)
            say(f"student: {n} of the teacher's {teacher_cfg.n_layers} layers -> {init}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(init)))
    elif cfg.model.init_from is None:  # a preset: the teacher's vocabulary and special tokens
        overrides = dict(cfg.model.overrides)
        overrides.setdefault("vocab_size", teacher_cfg.vocab_size)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(teacher_cfg, name) is not None:
                overrides.setdefault(name, getattr(teacher_cfg, name))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, overrides=overrides))
    student_cfg = cfg.model.build(int(index["vocab_size"]), int(index["eos_id"]))
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(
            f"the student's vocabulary ({student_cfg.vocab_size}) differs from the teacher's "
            f"({teacher_cfg.vocab_size}): the KL term compares their distributions token by token"
        )
    if cfg.data.tokenizer_dir is None and (Path(teacher_dir) / "tokenizer.json").is_file():
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_dir=teacher_dir))

    split = cfg.eval.split
    has_heldout = cfg.distill.eval_batches > 0 and split in index["splits"]
    report: dict[str, Any] = {
        "teacher": teacher_dir,
        "teacher_layers": teacher_cfg.n_layers,
        "teacher_params": teacher_cfg.num_params(),
        "student_layers": student_cfg.n_layers,
        "student_params": student_cfg.num_params(),
        "alpha": cfg.distill.alpha,
        "temperature": cfg.distill.temperature,
    }
    task = DistillTask(teacher_dir, cfg.distill.alpha, cfg.distill.temperature)
    if has_heldout and resume is None:
        if cfg.model.init_from:
            start = load_model_dir(cfg.model.init_from, dtype=torch.float32)
        else:
            from lmforge.model.transformer import Transformer

            torch.manual_seed(cfg.seed)  # the loop's own seed: the same initial weights it trains
            start = Transformer(student_cfg)
        report["before"] = heldout_figures(start, task, cfg)
        say(_figures_line("before", report["before"]))

    run = pretrain(cfg, resume=resume, verbose=verbose, task=task)
    if run.model_dir is not None:
        student = load_model_dir(run.model_dir, dtype=torch.float32)
        if has_heldout:
            report["after"] = heldout_figures(student, task, cfg)
            say(_figures_line("after", report["after"]))
        meta_path = run.model_dir / "lmforge.json"
        meta = json.loads(meta_path.read_text())
        meta["distill"] = report
        meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return DistillResult(run=run, report=report)


def _figures_line(when: str, f: dict[str, float]) -> str:
    return (
        f"held-out {when}: KL to teacher {f['kl']:.4f}, loss {f['loss']:.4f} "
        f"(teacher {f['teacher_loss']:.4f})"
    )


@torch.inference_mode()
def heldout_figures(student: torch.nn.Module, task: DistillTask, cfg: DistillConfig) -> dict[str, float]:
    """KL(teacher || student) at T=1 and at the training temperature, and both models' next-token
    loss, over the first `distill.eval_batches` batches of the validation split (identical tokens
    for every call, so before/after compare directly)."""
    data = PackedTokenDataset(cfg.data.shards_dir, cfg.eval.split, cfg.data.seq_len, shuffle=False)
    teacher = task.teacher(torch.device("cpu"))
    student.eval()
    sums = {"kl": 0.0, "kl_t": 0.0, "loss": 0.0, "teacher_loss": 0.0}
    n = 0
    for inputs, targets in data.iter_eval_batches(
        cfg.data.micro_batch_size, max_batches=cfg.distill.eval_batches
    ):
        s_logits, t_logits = student(inputs), teacher(inputs)
        kl, loss = distill_terms(s_logits, t_logits, targets, 1.0)
        kl_t, _ = distill_terms(s_logits, t_logits, targets, cfg.distill.temperature)
        _, teacher_loss = distill_terms(t_logits, t_logits, targets, 1.0)
        w = int((targets != -100).sum())
        for key, value in (("kl", kl), ("kl_t", kl_t), ("loss", loss), ("teacher_loss", teacher_loss)):
            sums[key] += float(value) * w
        n += w
    figures = {k: v / max(n, 1) for k, v in sums.items()}
    figures["ppl"] = math.exp(min(figures["loss"], 700.0))
    figures["tokens"] = float(n)
    return figures
