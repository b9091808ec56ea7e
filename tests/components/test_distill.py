"""Distillation: the loss terms, the student built from the teacher's layers, the stage lowering the
student's KL to the teacher on held-out shards (in-process, through the pretraining loop), MLflow and
the CLI, bad input. The Ray Train run is in test_distill_ray.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _compress_data import one_thread, train_tiny_model

from lmforge.cli import main as cli_main
from lmforge.components.distill import DistillConfig, distill
from lmforge.components.distill.student import student_from_teacher, teacher_layer_indices
from lmforge.components.distill.task import DistillTask, distill_terms
from lmforge.config import apply_overrides, build
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer, load_model_dir
from lmforge.model.checkpoint import read_config, save_model_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, _one_thread) -> tuple[Path, Path]:
    """(shards, teacher dir): the tiny preset, 2 layers, trained 40 steps."""
    return train_tiny_model(tmp_path_factory.mktemp("distill"), steps=40)


def config(shards: Path, teacher_dir: Path, out: Path, *overrides: str) -> DistillConfig:
    data = {
        "output_dir": str(out),
        "model": {"preset": "tiny", "overrides": {"n_layers": 1}},
        "data": {"shards_dir": str(shards), "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 15, "warmup_steps": 2},
        "checkpoint": {"every": 15},
        "eval": {"every": 0},
        "tracking": {"enabled": False, "log_every": 5},
        "ray": {"num_workers": 0},
        "distill": {"teacher": str(teacher_dir), "alpha": 0.9, "temperature": 2.0, "eval_batches": 4},
    }
    return build(DistillConfig, apply_overrides(data, list(overrides)))


# ---- loss and student --------------------------------------------------------------------------
def test_distill_terms() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100  # not scored: excluded from both terms
    kl, hard = distill_terms(s, t, targets, 2.0)
    keep = targets != -100
    p_t = F.softmax(t[keep] / 2, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s[keep] / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(hard, F.cross_entropy(s[keep], targets[keep]))
    zero, _ = distill_terms(t, t, targets, 3.0)
    assert abs(float(zero)) < 1e-6


def test_task_loss_weights_and_pickles_without_the_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
    save_model_dir(teacher, tmp_path / "t")
    student = Transformer(ModelConfig.from_name("tiny", vocab_size=64, n_layers=1)).train()
    ids = torch.randint(0, 64, (2, 9))
    batch = (ids, ids.roll(-1, 1))
    task = DistillTask(str(tmp_path / "t"), alpha=0.25, temperature=2.0)
    loss = task.loss(student, batch)
    kl, hard = distill_terms(student(ids), task.teacher(torch.device("cpu"))(ids), batch[1], 2.0)
    torch.testing.assert_close(loss, 0.25 * 4 * kl + 0.75 * hard)
    # what travels to the Ray workers (pickle's state) leaves the teacher's weights behind
    assert task.__getstate__()["_teacher"] is None and task._teacher is not None
    student.eval()  # validation: the student's own next-token loss
    torch.testing.assert_close(task.loss(student, batch), hard, rtol=1e-5, atol=1e-5)


def test_student_from_teacher_layers() -> None:
    assert teacher_layer_indices(8, 4) == [0, 2, 5, 7] and teacher_layer_indices(4, 2) == [0, 3]
    assert teacher_layer_indices(3, 1) == [0]
    teacher = Transformer(ModelConfig.from_name("tiny", n_layers=4)).eval()
    same = student_from_teacher(teacher, 4).eval()
    ids = torch.randint(0, 1024, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(same(ids), teacher(ids))
    half = student_from_teacher(teacher, 2)
    assert half.config.n_layers == 2
    assert torch.equal(half.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(half.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


# ---- the stage -----------------------------------------------------------------------------------
def test_distillation_lowers_the_students_kl_to_the_teacher(teacher, tmp_path: Path) -> None:
    shards, teacher_dir = teacher
    result = distill(config(shards, teacher_dir, tmp_path / "run", "eval.every=15"))
    before, after = result.report["before"], result.report["after"]
    assert after["kl"] < 0.8 * before["kl"]  # the student moved towards the teacher
    assert after["loss"] < before["loss"]
    assert after["teacher_loss"] == pytest.approx(before["teacher_loss"])  # the teacher stayed frozen
    student = load_model_dir(result.model_dir)
    assert student.config.n_layers == 1 and student.config.vocab_size == read_config(teacher_dir).vocab_size
    assert (
        json.loads((result.model_dir / "lmforge.json").read_text())["distill"]["after"]["kl"] == after["kl"]
    )
    assert json.loads((tmp_path / "run" / "distill_report.json").read_text())["before"]["kl"] == before["kl"]
    assert (result.model_dir / "tokenizer.json").is_file()
    assert "val/loss" in result.run.metrics  # the student's own loss, from the loop's validation


def test_cli_teacher_half_and_resume(teacher, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards, teacher_dir = teacher
    out = tmp_path / "cli"
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(
        "data: {seq_len: 64, global_batch_size: 8, micro_batch_size: 4}\n"
        "schedule: {max_steps: 4, warmup_steps: 1}\ncheckpoint: {every: 2}\neval: {every: 0}\n"
        "tracking: {enabled: false}\ndistill: {eval_batches: 2}\n"
    )
    args = [
        "distill",
        "--teacher",
        str(teacher_dir),
        "--student-preset",
        "teacher-half",
        "--data",
        str(shards),
    ]
    args += ["--output", str(out), "--config", str(cfg_file), "--local"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "distilled" in printed and "held-out KL to teacher" in printed
    assert read_config(out / "student-init").n_layers == 1 and read_config(out / "model").n_layers == 1
    # more steps, continued from the last checkpoint
    assert cli_main(args + ["--resume", "auto", "--set", "schedule.max_steps=6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # again without --resume: refused (one line, exit 2)
    assert cli_main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_bad_input(teacher, tmp_path: Path) -> None:
    shards, teacher_dir = teacher
    with pytest.raises(ConfigError, match="config.json is missing"):
        distill(config(shards, tmp_path / "nope", tmp_path / "a"))
    with pytest.raises(ConfigError, match="a student must have fewer"):
        distill(config(shards, teacher_dir, tmp_path / "b", "distill.student_layers=2"))
    other = Transformer(ModelConfig.from_name("tiny", vocab_size=600))
    save_model_dir(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="differs from the teacher's"):
        distill(config(shards, teacher_dir, tmp_path / "c", f"model.init_from={tmp_path / 'other'}"))
    for override, message in [
        ("distill.alpha=1.5", "distill.alpha"),
        ("distill.temperature=0", "distill.temperature"),
        ("distill.student_layers=quarter", "distill.student_layers"),
        ("distill.teacher=", "distill.teacher"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config(shards, teacher_dir, tmp_path / "d", override)
    assert not (tmp_path / "b" / "checkpoints").exists() and not (tmp_path / "c" / "checkpoints").exists()
