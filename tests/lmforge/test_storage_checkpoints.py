"""Ray Train checkpoints in S3 (`checkpoint.storage: s3://BUCKET/PREFIX`): a tiny pretraining on the
session's Ray writes its checkpoints to a moto_server bucket, is stopped, and a `--resume auto` run
reads the newest one back from the bucket and finishes; a fresh run into the same storage is
refused. The settings are checked before anything starts."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "components"))
from _pretrain_data import build_sample_shards, tiny_config

from lmforge.components.pretrain import checkpointing, pretrain
from lmforge.components.pretrain.checkpointing import CheckpointError
from lmforge.model.config import ConfigError
from lmforge.storage import StorageError

STORAGE = "s3://lmforge-ckpt/runs/tiny"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_sample_shards(tmp_path_factory.mktemp("s3-ckpt-data"))


def test_checkpoint_storage_is_checked_before_anything_runs(shards, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="checkpoint.storage must be an s3://"):
        tiny_config(shards, tmp_path / "a", "checkpoint.storage=/mnt/ckpt", "ray.num_workers=1")
    with pytest.raises(ConfigError, match="checkpoint.storage: .*names no bucket"):
        tiny_config(shards, tmp_path / "a", "checkpoint.storage=s3:///x", "ray.num_workers=1")
    with pytest.raises(ConfigError, match="needs Ray Train"):
        tiny_config(shards, tmp_path / "a", f"checkpoint.storage={STORAGE}")  # ray.num_workers=0
    # fine-tuning shares the section and the Ray wiring (its own stage resolves --resume the same way)
    from lmforge.components.finetune.config import FinetuneConfig
    from lmforge.components.pretrain.config import CheckpointSection, RaySection

    with pytest.raises(ConfigError, match="needs Ray Train"):
        FinetuneConfig(base_model="m", checkpoint=CheckpointSection(storage=STORAGE))
    tuned = FinetuneConfig(base_model="m", checkpoint=CheckpointSection(storage=STORAGE), ray=RaySection(1))
    assert tuned.to_train_config().checkpoint.storage == STORAGE
    monkeypatch.delenv("LMFORGE_S3_ENDPOINT", raising=False)
    cfg = tiny_config(shards, tmp_path / "a", f"checkpoint.storage={STORAGE}", "ray.num_workers=1")
    with pytest.raises(StorageError, match="needs LMFORGE_S3_ENDPOINT"):
        pretrain(cfg)  # before Ray starts
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_pretraining_checkpoints_to_s3_and_resumes_from_there(
    ray_local, s3_env, shards, tmp_path, capfd
) -> None:
    sets = [
        f"checkpoint.storage={STORAGE}",
        "ray.num_workers=1",
        "ray.max_failures=0",
        "schedule.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep_last=2",
        "eval.every=0",
    ]
    cfg = tiny_config(shards, tmp_path / "first", *sets)
    driver, seen = os.getpid(), tmp_path / "steps.txt"

    def preempt_at_2(step: int, rank: int) -> None:
        with open(seen, "a") as fh:
            fh.write(f"{step}\n")
        if step == 2:
            os.kill(driver, signal.SIGTERM)  # the job's driver is asked to stop: checkpoint and return

    first = pretrain(cfg, on_step=preempt_at_2, verbose=False)
    assert first.preempted and first.model_dir is None
    remote = checkpointing.list_remote_checkpoints(STORAGE)
    assert (
        remote
        and remote[-1] == f"lmforge-ckpt/runs/tiny/checkpoints/{checkpointing.checkpoint_name(first.step)}"
    )
    fs = s3_env.filesystem()
    with fs.open_input_stream(f"{remote[-1]}/trainer_state.json") as fh:
        assert b'"step": %d' % first.step in fh.read()
    # the driver keeps a local copy of the newest checkpoint (what the stage consolidates or reports)
    assert first.checkpoint_dir == tmp_path / "first" / "checkpoints" / Path(remote[-1]).name

    # a fresh run into the same storage would silently continue (Ray's snapshot): refused
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume auto"):
        pretrain(tiny_config(shards, tmp_path / "second", *sets))

    seen.write_text("")
    resumed = pretrain(
        tiny_config(shards, tmp_path / "second", *sets),
        resume="auto",
        on_step=lambda step, rank: open(seen, "a").write(f"{step}\n"),
        verbose=False,
    )
    steps = [int(s) for s in seen.read_text().split()]
    assert steps == list(range(first.step + 1, 7))  # continued from the checkpoint read back from S3
    assert not resumed.preempted and resumed.step == 6
    assert resumed.model_dir is not None and (resumed.model_dir / "model.safetensors").is_file()
    assert checkpointing.list_remote_checkpoints(STORAGE)[-1].endswith("step-00000006")
    assert resumed.checkpoint_dir == tmp_path / "second" / "checkpoints" / "step-00000006"  # local copy
    # the credentials reach Ray inside the filesystem object, never a console line or a log file
    out, err = capfd.readouterr()
    assert s3_env.secret_key not in out + err
    assert not [
        p for p in tmp_path.rglob("*") if p.is_file() and s3_env.secret_key.encode() in p.read_bytes()
    ]
