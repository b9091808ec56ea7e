"""`lmforge run --resume`: the pipeline's pretrain step keeps its checkpoints at a stable place
under the workdir (keyed by the pretraining config and the data and tokenizer hashes), so an
interrupted pretraining outlives its task: the next run refuses to start it afresh and points at
--resume; with it ($LMFORGE_PRETRAIN_RESUME=1, what `lmforge run --resume` sets for the tasks) the
training continues from its newest checkpoint; a finished one is reused rather than trained again;
another config trains in a folder of its own.

The stage functions of `pipelines/steps.py` are called in this process (what the components call),
on a slice of the sample corpus with a tiny model; the pipeline around them is covered by
test_pipeline_local.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load, to_dict
from lmforge.errors import UserError
from lmforge.pipelines import steps
from lmforge.pipelines.config import LifecycleConfig

pytestmark = pytest.mark.slow  # 1-2 min on 2 cores: four short trainings


def _config(repo_root: Path, tmp_path: Path, *extra: str) -> str:
    overrides = [
        f"workdir={tmp_path / 'work'}",
        f"inputs=[{repo_root / 'data/sample/python-docs/tutorial'}]",
        "tokenizer.vocab_size=600",
        "curate.split.validation=0.25",
        "pretrain.model.preset=tiny",
        "pretrain.data.seq_len=64",
        "pretrain.data.global_batch_size=4",
        "pretrain.data.micro_batch_size=4",
        "pretrain.schedule.max_steps=6",
        "pretrain.schedule.warmup_steps=2",
        "pretrain.checkpoint.every=3",
        "pretrain.eval.every=0",
        "pretrain.ray.num_workers=0",
        *extra,
    ]
    return json.dumps(to_dict(load(LifecycleConfig, repo_root / "configs/demo.yaml", overrides)))


@pytest.fixture
def shards(repo_root, tmp_path, monkeypatch):
    """Curated data, tokenizer and shards through the pipeline's stage functions; their lineage."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LMFORGE_PRETRAIN_RESUME", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config, art = _config(repo_root, tmp_path), tmp_path / "artifacts"
    art.mkdir()
    _, lineage = steps.curate(config, str(art / "data"), str(art / "datacard.md"))
    _, lineage = steps.train_tokenizer(
        config, str(art / "data"), str(art / "tok"), str(art / "r.md"), lineage
    )
    _, lineage = steps.tokenize(str(art / "data"), str(art / "tok"), str(art / "shards"), lineage)
    return str(art / "shards"), lineage


def _pretrain(tmp_path: Path, config: str, shards, task: str, **kwargs):
    out = tmp_path / "artifacts" / task
    out.mkdir()
    metrics, _ = steps.pretrain(
        config, shards[0], str(out / "model"), str(out / "loss.png"), shards[1], **kwargs
    )
    return metrics, out / "model"


def test_interrupted_pretraining_continues_with_resume_and_a_finished_one_is_reused(
    repo_root, tmp_path, shards, monkeypatch, capsys
):
    config = _config(repo_root, tmp_path)

    def fail_at_step_5(step: int, rank: int) -> None:
        if step == 5:
            raise RuntimeError("injected failure at step 5")

    with pytest.raises(RuntimeError, match="injected"):
        _pretrain(tmp_path, config, shards, "first", on_step=fail_at_step_5)
    (work,) = (tmp_path / "work" / "pretrain").iterdir()  # <workdir>/pretrain/<key>
    assert [p.name for p in (work / "checkpoints").iterdir() if p.name.startswith("step-")] == [
        "step-00000003"
    ]

    # Without --resume the next run stops rather than discard the checkpoint ...
    with pytest.raises(UserError, match=r"did not finish \(newest checkpoint: step-00000003\).*--resume"):
        _pretrain(tmp_path, config, shards, "second")

    # ... with it (the environment `lmforge run --resume` sets), training continues from step 3.
    monkeypatch.setenv("LMFORGE_PRETRAIN_RESUME", "1")
    capsys.readouterr()
    metrics, model = _pretrain(tmp_path, config, shards, "resumed")
    assert "resuming from" in capsys.readouterr().out and metrics["steps"] == 6
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    monkeypatch.delenv("LMFORGE_PRETRAIN_RESUME")

    # The finished training is reused: the same weights, no training.
    metrics, again = _pretrain(tmp_path, config, shards, "again")
    assert "trained before" in capsys.readouterr().out and metrics["steps"] == 6
    assert (again / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()

    # Another pretraining config trains in a folder of its own, leaving the first one alone.
    changed = _config(repo_root, tmp_path, "pretrain.optim.lr=1e-3")
    _pretrain(tmp_path, changed, shards, "changed")
    assert len(list((tmp_path / "work" / "pretrain").iterdir())) == 2
    assert (work / "result.json").is_file()
