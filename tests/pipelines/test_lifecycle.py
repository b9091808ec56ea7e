"""`lmforge run` end to end on a slice of the sample corpus: every stage for real (curation,
tokenizer, shards, pretraining, MLflow registry on sqlite, generation), a tiny model, a few steps;
then run again: unchanged steps reused, a change re-runs its step and what follows, a failing run
leaves run.json alone, an interrupted pretraining continues with --resume."""

import json
import shutil

import pytest

from lmforge.config import load
from lmforge.errors import UserError
from lmforge.pipelines.lifecycle import LifecycleConfig, run_lifecycle

pytestmark = pytest.mark.slow
STEPS = ["curate", "tokenizer", "tokenize", "pretrain", "register", "generate"]


def _config(repo_root, tmp_path, **extra):
    overrides = [
        f"workdir={tmp_path / 'work'}",
        f"inputs=[{repo_root / 'data/sample/python-docs/tutorial'}]",
        "tokenizer.vocab_size=600",
        "curate.split.validation=0.25",  # 17 documents: make sure validation gets some
        "pretrain.model.preset=tiny",
        "pretrain.data.seq_len=64",
        "pretrain.data.global_batch_size=4",
        "pretrain.data.micro_batch_size=4",
        "pretrain.schedule.max_steps=6",
        "pretrain.schedule.warmup_steps=2",
        "pretrain.checkpoint.every=3",
        "pretrain.eval.every=3",
        "pretrain.eval.batches=2",
        "pretrain.ray.num_workers=0",
        "generate.max_new_tokens=8",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load(LifecycleConfig, repo_root / "configs/demo.yaml", overrides)


def _statuses(result) -> dict[str, str]:
    return {name: step["status"] for name, step in result.steps.items()}


def _versions() -> list[str]:
    from mlflow import MlflowClient

    return sorted(str(v.version) for v in MlflowClient().search_model_versions("name='lmforge-demo'"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_rerun_reuses_unchanged_steps_and_reruns_from_a_change(repo_root, isolated):
    tmp_path, logs = isolated, []
    result = run_lifecycle(_config(repo_root, tmp_path), log=logs.append)
    record_path = result.workdir / "run.json"
    record = json.loads(record_path.read_text())
    assert record["status"] == "succeeded" and list(record["steps"]) == STEPS
    assert _statuses(result) == dict.fromkeys(STEPS, "ran")
    assert record["steps"]["curate"]["documents_kept"] > 0
    assert record["steps"]["tokenize"]["train_tokens"] > 0
    assert (result.model_dir / "model.safetensors").is_file()
    assert (result.model_dir / "tokenizer.json").is_file()
    assert result.registered == "models:/lmforge-demo@candidate" and _versions() == ["1"]
    assert len(result.samples) == 2 and all(s["tokens"] > 0 for s in result.samples)
    assert set(result.artifacts) == {"model", "datacard", "fertility report", "loss curve", "run record"}
    assert all(path.exists() for path in result.artifacts.values())

    # The same config again: nothing runs, nothing new is registered, and the log says so.
    logs.clear()
    again = run_lifecycle(_config(repo_root, tmp_path), log=logs.append)
    assert _statuses(again) == dict.fromkeys(STEPS, "reused")
    assert sum("reused" in line for line in logs) == len(STEPS)
    assert again.samples == result.samples and _versions() == ["1"]
    assert json.loads(record_path.read_text())["steps"]["pretrain"]["status"] == "reused"

    # A run that fails (every input document rejected, so no tokenizer can be trained) replaces
    # the curated data but not the record of the last successful run.
    good = record_path.read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "note.txt").write_text("too short")
    with pytest.raises(UserError):
        run_lifecycle(_config(repo_root, tmp_path, inputs=f"[{tmp_path / 'bad'}]"), log=lambda _: None)
    assert record_path.read_bytes() == good
    partial = json.loads((result.workdir / "run.partial.json").read_text())
    assert partial["status"] == "failed" and partial["steps"]["tokenizer"]["status"] == "failed"

    # Back to the original inputs: curation runs again (its output on disk changed); its output is
    # the same as before, so everything after it is reused.
    back = run_lifecycle(_config(repo_root, tmp_path), log=lambda _: None)
    assert _statuses(back) == {"curate": "ran", **dict.fromkeys(STEPS[1:], "reused")}
    assert not (result.workdir / "run.partial.json").exists()

    # A pretraining field changed: pretraining and the steps after it run, the ones before are reused.
    changed = run_lifecycle(_config(repo_root, tmp_path, **{"pretrain.optim.lr": 1e-3}), log=lambda _: None)
    assert _statuses(changed) == {
        **dict.fromkeys(STEPS[:3], "reused"),
        **dict.fromkeys(STEPS[3:], "ran"),
    }
    assert _versions() == ["1", "2"]

    # --overwrite: every step afresh.
    fresh = run_lifecycle(_config(repo_root, tmp_path), log=lambda _: None, overwrite=True)
    assert _statuses(fresh) == dict.fromkeys(STEPS, "ran")


def test_interrupted_pretraining_continues_with_resume(repo_root, isolated):
    tmp_path, logs = isolated, []

    def fail_at_step_5(step: int, rank: int) -> None:
        if step == 5:
            raise RuntimeError("injected failure at step 5")

    with pytest.raises(RuntimeError, match="injected"):
        run_lifecycle(_config(repo_root, tmp_path), log=lambda _: None, on_pretrain_step=fail_at_step_5)
    work = tmp_path / "work"
    assert not (work / "run.json").exists()
    assert json.loads((work / "run.partial.json").read_text())["steps"]["pretrain"]["status"] == "failed"

    # Without --resume the run stops rather than discard the checkpoints ...
    with pytest.raises(UserError, match="--resume"):
        run_lifecycle(_config(repo_root, tmp_path), log=lambda _: None)
    assert (work / "pretrain" / "checkpoints").is_dir()

    # ... with it, pretraining continues from step 3 and the steps before it are reused.
    result = run_lifecycle(_config(repo_root, tmp_path), log=logs.append, resume=True)
    assert _statuses(result) == {**dict.fromkeys(STEPS[:3], "reused"), **dict.fromkeys(STEPS[3:], "ran")}
    assert any("resuming from" in line and "step-00000003" in line for line in logs)
    assert result.steps["pretrain"]["steps"] == 6
    assert json.loads((work / "run.json").read_text())["status"] == "succeeded"

    # The model directory lost: rebuilt from the final checkpoint, not trained again.
    shutil.rmtree(result.model_dir)
    logs.clear()
    rebuilt = run_lifecycle(_config(repo_root, tmp_path), log=logs.append)
    assert (
        rebuilt.steps["pretrain"]["status"] == "ran" and (rebuilt.model_dir / "model.safetensors").is_file()
    )
    assert any("rebuilding the model from the final checkpoint" in line for line in logs)
