"""Every section of the `lmforge run` config is checked before any step starts: a bad value is a
one-line error naming the field, and an existing workdir (the demo's data) is left untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import load
from lmforge.errors import InputNotFoundError, UserError
from lmforge.model.config import ConfigError
from lmforge.pipelines.config import LifecycleConfig
from lmforge.pipelines.local import run_pipeline_locally


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tokenizer.vocab_size=10", "vocab_size=10 is too small"),
        ("tokenizer.min_frequency=0", "min_frequency"),
        ("generate.temperature=-1", "temperature"),
        ("generate.prompts=['']", "empty prompt"),
        ("register.alias=latest", "reserved"),
        ("register.alias=v2", "reserved"),
        ("register.model_name=a/b", "model_name"),
        ("curate.split.validation=2", "validation"),
        ("inputs=[]", "inputs"),
    ],
)
def test_each_section_is_validated_while_loading(repo_root: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(LifecycleConfig, repo_root / "configs/demo.yaml", [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.schedule.max_steps=0"], r"pretrain\.schedule.*max_steps"),
        (["pretrain.model.overrides.vocab_size=1000"], "smaller than tokenizer.vocab_size=8192"),
        (["curate.split.validation=0"], r"pretrain\.eval\.split='validation' will be empty"),
        (["pretrain.eval.split=holdout"], "curation writes only"),
    ],
)
def test_sections_are_checked_together(repo_root: Path, overrides: list[str], message: str) -> None:
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.check()


def test_demo_config_is_valid(repo_root: Path) -> None:
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml")
    pretrain = cfg.check()
    assert pretrain.resolved_run_name == "lmforge-demo"  # the MLflow run is named after the model
    assert Path(pretrain.output_dir) == (Path(cfg.workdir) / "pretrain").resolve()


def test_bad_value_fails_before_any_step_and_leaves_the_workdir_alone(
    repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "datacard.json").write_text("{}")  # stands for an earlier run's curated data
    (work / "run.json").write_text('{"earlier": true}')
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    argv = ["run", "--config", str(repo_root / "configs/demo.yaml"), "--set", f"workdir={work}"]
    for bad in ("tokenizer.vocab_size=10", "pretrain.schedule.max_steps=0"):
        assert main([*argv, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: invalid config:" in err
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before

    missing = load(LifecycleConfig, overrides=[f"workdir={tmp_path / 'new'}", "curate.split.validation=0"])
    with pytest.raises(ConfigError):
        run_pipeline_locally(missing, log=lambda _: None)
    assert not (tmp_path / "new").exists()


def test_missing_local_input_fails_before_any_step(tmp_path: Path) -> None:
    cfg = load(
        LifecycleConfig, overrides=[f"workdir={tmp_path / 'work'}", f"inputs=[{tmp_path / 'nowhere'}]"]
    )
    with pytest.raises(InputNotFoundError, match="nowhere"):
        run_pipeline_locally(cfg, log=lambda _: None)
    assert not (tmp_path / "work").exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path) -> None:
    cfg = load(LifecycleConfig, overrides=[f"workdir={tmp_path / 'work'}"])
    with pytest.raises(UserError, match="contradict"):
        run_pipeline_locally(cfg, log=lambda _: None, resume=True, overwrite=True)
    assert not (tmp_path / "work").exists()
