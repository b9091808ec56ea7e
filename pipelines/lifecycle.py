"""The whole lifecycle on one machine: curate -> tokenizer -> tokenize -> pretrain -> register -> generate.

`lmforge run` calls `run_lifecycle`. Each step is the same stage function its CLI verb calls; this
module only wires outputs to inputs and keeps the run record in the
workdir (`pipelines/run_record.py`), which makes a run re-runnable:
  - a step whose config and inputs are unchanged (same fingerprint, outputs intact) is reused;
  - a changed step runs again, and so does every step whose inputs it changes;
  - `overwrite=True` runs every step afresh;
  - `resume=True` continues a pretraining that was interrupted (same config and data) from its
    newest checkpoint; without it such a run stops and says so, rather than discard the work.
With embedded defaults it needs no service: local folders, MLflow on sqlite, and Ray started
in-process when `pretrain.ray.num_workers > 0`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.components.pretrain.config import PretrainConfig
from lmforge.config import to_dict
from lmforge.errors import UserError
from lmforge.pipelines.config import GenerateSection, LifecycleConfig, RegisterSection, TokenizerSection
from lmforge.pipelines.run_record import (
    DONE,
    RunRecord,
    file_sha256,
    files_digest,
    fingerprint,
    now,
    tree_digest,
)

__all__ = [
    "GenerateSection",
    "LifecycleConfig",
    "LifecycleResult",
    "RegisterSection",
    "TokenizerSection",
    "run_lifecycle",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class StepInterrupted(UserError):
    """A step stopped before finishing (pretraining preempted by SIGTERM); its work can be resumed."""


@dataclass
class Step:
    """One step as the runner sees it: what identifies it, how to run it, how to check its outputs."""

    name: str
    config: Any  # hashed into the fingerprint with the inputs
    inputs: dict[str, str | None]  # content digests of what it reads (None: cannot be fingerprinted)
    run: Callable[[], dict[str, Any]]  # does the work; returns the outputs and metrics to record
    digest: Callable[[], str | None] = lambda: None  # digest of its outputs on disk (None: nothing on disk)
    still_valid: Callable[[dict[str, Any]], bool] | None = None  # extra check of an earlier entry


@dataclass
class LifecycleResult:
    workdir: Path
    record_path: Path  # run.json
    model_dir: Path
    registered: str | None  # models:/NAME@ALIAS
    samples: list[dict[str, Any]]
    steps: dict[str, dict[str, Any]]  # the record's entry per step ("status": "ran" | "reused", ...)
    artifacts: dict[str, Path]  # what a user looks at next: model, datacard, fertility report, ...
    tracking_uris: list[str]  # the MLflow stores written to (tracking, registry)
    seconds: float


def run_lifecycle(
    cfg: LifecycleConfig,
    log: Callable[[str], None] = print,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_pretrain_step: Callable[[int, int], None] | None = None,
) -> LifecycleResult:
    """Run (or reuse) every step; see the module docstring. `on_pretrain_step(step, rank)` is passed
    to pretraining (tests use it to interrupt a run)."""
    from lmforge.components.curate.config import public_dict

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one of them")
    pretrain_cfg = cfg.check()  # every section validated before anything is written
    start = time.perf_counter()
    work = Path(cfg.workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    record = RunRecord(work, {**to_dict(cfg), "curate": public_dict(cfg.curate)})
    runner = _Runner(record, log, overwrite)
    try:
        result = _wire(cfg, pretrain_cfg, work, runner, resume, on_pretrain_step)
    except KeyboardInterrupt:
        record.finish("interrupted", "interrupted by the user")
        raise
    except BaseException as err:
        record.finish("interrupted" if isinstance(err, StepInterrupted) else "failed", f"{err}")
        raise
    result.seconds = round(time.perf_counter() - start, 2)
    record.data["seconds"] = result.seconds
    record.finish("succeeded")
    return result


def _wire(
    cfg: LifecycleConfig,
    pretrain_cfg: PretrainConfig,
    work: Path,
    runner: _Runner,
    resume: bool,
    on_pretrain_step: Callable[[int, int], None] | None,
) -> LifecycleResult:
    """The steps in order, each reading the digests of the outputs before it."""
    from lmforge.components.curate.config import public_dict
    from lmforge.tracking import default_tracking_uri

    data_dir, tok_dir, shards_dir = work / "data", work / "tokenizer", work / "tokens"
    curated = runner.do(
        Step(
            "curate",
            public_dict(cfg.curate),
            {"inputs": _inputs_digest(cfg)},
            lambda: _curate(cfg, data_dir),
            lambda: _dataset_digest(data_dir),
        )
    )
    tokenizer = runner.do(
        Step(
            "tokenizer",
            dataclasses.asdict(cfg.tokenizer),
            {"data": curated["output_sha256"]},
            lambda: _train_tokenizer(cfg, data_dir, tok_dir),
            lambda: files_digest(tok_dir, TOKENIZER_FILES),
        )
    )
    tokens = runner.do(
        Step(
            "tokenize",
            {},
            {"data": curated["output_sha256"], "tokenizer": tokenizer["output_sha256"]},
            lambda: _tokenize(data_dir, tok_dir, shards_dir),
            lambda: _shards_digest(shards_dir),
        )
    )
    model_dir = pretrain_cfg.model_dir()
    pretrain_inputs = {"tokens": tokens["output_sha256"], "tokenizer": tokenizer["output_sha256"]}
    pretrain_fp = fingerprint("pretrain", to_dict(pretrain_cfg), pretrain_inputs)
    trained = runner.do(
        Step(
            "pretrain",
            to_dict(pretrain_cfg),
            pretrain_inputs,
            lambda: _pretrain(pretrain_cfg, runner, pretrain_fp, resume, work, on_pretrain_step),
            lambda: tree_digest(model_dir),
        )
    )
    model_dir = Path(trained["model_dir"])
    uris = [trained["tracking_uri"]] if trained.get("tracking_uri") else []

    registered = None
    if cfg.register.enabled:
        registry_uri = default_tracking_uri()
        reg = runner.do(
            Step(
                "register",
                {**dataclasses.asdict(cfg.register), "tracking_uri": registry_uri},
                {"model": trained["output_sha256"]},
                lambda: _register(model_dir, cfg.register, registry_uri, trained.get("mlflow_run_id")),
                still_valid=lambda earlier: _alias_unmoved(registry_uri, earlier),
            )
        )
        registered = reg["uri"]
        uris += [registry_uri] if registry_uri not in uris else []

    generated = runner.do(
        Step(
            "generate",
            dataclasses.asdict(cfg.generate),
            {"model": trained["output_sha256"]},
            lambda: {"samples": _generate(model_dir, cfg.generate)},
        )
    )
    artifacts = {
        "model": model_dir,
        "datacard": data_dir / "datacard.md",
        "fertility report": tok_dir / "fertility.md",
        "loss curve": Path(trained["loss_curve"]) if trained.get("loss_curve") else None,
    }
    artifacts = {k: v for k, v in artifacts.items() if v is not None and v.exists()}
    artifacts["run record"] = runner.record.path  # written when the run succeeds
    return LifecycleResult(
        workdir=work,
        record_path=runner.record.path,
        model_dir=model_dir,
        registered=registered,
        samples=generated["samples"],
        steps=runner.record.steps,
        artifacts=artifacts,
        tracking_uris=uris,
        seconds=0.0,
    )


# ---- the runner: reuse or run, and record -------------------------------------------------------
class _Runner:
    def __init__(self, record: RunRecord, log: Callable[[str], None], overwrite: bool) -> None:
        self.record, self.log, self.overwrite = record, log, overwrite

    def do(self, step: Step) -> dict[str, Any]:
        fp = fingerprint(step.name, step.config, step.inputs)
        if not self.overwrite:
            earlier = self.reusable(step, fp)
            if earlier is not None:
                entry = {**earlier, "status": "reused"}
                self.record.set_step(step.name, entry)
                self.log(f"lmforge run: {step.name}: unchanged since {earlier.get('ran_at')}, reused")
                return entry
        why = "" if fp is not None or self.overwrite else " (its inputs cannot be fingerprinted)"
        self.log(f"lmforge run: {step.name} ...{why}")
        self.record.set_step(step.name, {"status": "running", "fingerprint": fp, "started_at": now()})
        start = time.perf_counter()
        try:
            out = step.run()
        except (KeyboardInterrupt, StepInterrupted):
            self.record.set_step(step.name, {**self.record.steps[step.name], "status": "interrupted"})
            raise
        except BaseException as err:
            self.record.set_step(
                step.name, {**self.record.steps[step.name], "status": "failed", "error": f"{err}"}
            )
            raise
        entry = {
            "status": "ran",
            "fingerprint": fp,
            "ran_at": now(),
            "seconds": round(time.perf_counter() - start, 2),
            "output_sha256": step.digest(),
            **out,
        }
        self.record.set_step(step.name, entry)
        self.log(f"lmforge run: {step.name} done in {entry['seconds']} s")
        return entry

    def reusable(self, step: Step, fp: str | None) -> dict[str, Any] | None:
        """The newest earlier entry with this fingerprint whose outputs are still intact."""
        if fp is None:
            return None
        for earlier in self.record.earlier(step.name):
            if earlier.get("fingerprint") != fp or earlier.get("status") not in DONE:
                continue
            try:
                if step.still_valid is not None and not step.still_valid(earlier):
                    continue
                if step.digest() == earlier.get("output_sha256"):
                    return earlier
            except (OSError, ValueError, KeyError):  # outputs gone or damaged: run it again
                continue
        return None


# ---- digests of inputs and outputs --------------------------------------------------------------
def _inputs_digest(cfg: LifecycleConfig) -> str | None:
    """Digest of every input file as curation will list it (exclusions applied); None with S3
    inputs, whose content cannot be compared without reading it all."""
    from lmforge.components.curate.readers import list_sources

    if any(str(i).startswith("s3://") for i in cfg.inputs):
        return None
    digest = hashlib.sha256()
    for src in list_sources(cfg.inputs, cfg.curate).sources:
        digest.update(f"{src.input_index} {src.doc_id} {file_sha256(Path(src.uri))}\n".encode())
    return digest.hexdigest()


def _dataset_digest(data_dir: Path) -> str:
    """The curated dataset's content hash, recomputed from the files (equals the datacard's
    `content_sha256` while nothing was changed)."""
    from lmforge.components.curate.split import SPLITS

    card = json.loads((data_dir / "datacard.json").read_text(encoding="utf-8"))
    listed = [f["path"] for s in SPLITS for f in card["splits"][s]["files"]]
    on_disk = sorted(
        p.relative_to(data_dir).as_posix() for s in SPLITS for p in (data_dir / s).glob("*.jsonl*")
    )
    if sorted(listed) != on_disk:
        raise ValueError(f"{data_dir} holds other files than its datacard lists")
    return files_digest(data_dir, listed)


def _shards_digest(shards_dir: Path) -> str:
    index = json.loads((shards_dir / "index.json").read_text(encoding="utf-8"))
    listed = [s["file"] for split in index["splits"].values() for s in split["shards"]]
    if sorted(listed) != sorted(p.name for p in shards_dir.glob("*.bin")):
        raise ValueError(f"{shards_dir} holds other shards than its index lists")
    return files_digest(shards_dir, ["index.json", *listed])


# ---- the steps ----------------------------------------------------------------------------------
def _curate(cfg: LifecycleConfig, data_dir: Path) -> dict[str, Any]:
    from lmforge.components.curate.pipeline import curate

    result = curate(cfg.inputs, data_dir, cfg.curate, overwrite=True)
    return {"output": str(data_dir), "datacard": str(result.datacard_md_path), **result.metrics()}


def _train_tokenizer(cfg: LifecycleConfig, data_dir: Path, tok_dir: Path) -> dict[str, Any]:
    from lmforge.components.tokenizer import train_tokenizer

    result = train_tokenizer(
        [data_dir / "train"],
        tok_dir,
        vocab_size=cfg.tokenizer.vocab_size,
        min_frequency=cfg.tokenizer.min_frequency,
        holdout_fraction=cfg.tokenizer.holdout_fraction,
    )
    return {"output": str(tok_dir), "fertility_report": str(result.fertility_md), **result.metrics()}


def _tokenize(data_dir: Path, tok_dir: Path, shards_dir: Path) -> dict[str, Any]:
    from lmforge.components.tokenize_shards import tokenize_dataset

    result = tokenize_dataset(data_dir, tok_dir, shards_dir, overwrite=True)
    return {"output": str(shards_dir), **result.metrics()}


def _pretrain(
    cfg: PretrainConfig,
    runner: _Runner,
    fp: str | None,
    resume: bool,
    workdir: Path,
    on_step: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    from lmforge.components.pretrain.stage import pretrain
    from lmforge.tracking import default_tracking_uri

    spec = _resume_spec(cfg, runner, fp, resume, workdir)
    # verbose=False: the console gets the progress lines, Ray's own logs go to <output_dir>/logs/
    result = pretrain(cfg, resume=spec, on_step=on_step, verbose=False)
    if result.model_dir is None:
        raise StepInterrupted(
            f"pretraining stopped at step {result.step} before it finished (checkpoint "
            f"{result.checkpoint_dir}); run again with --resume to continue it"
        )
    return {
        "output": str(cfg.output_dir),
        "model_dir": str(result.model_dir),
        "loss_curve": str(result.loss_curve) if result.loss_curve else None,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": (cfg.tracking.tracking_uri or default_tracking_uri())
        if cfg.tracking.enabled
        else None,
        "steps": result.step,
        **result.metrics,
    }


def _resume_spec(
    cfg: PretrainConfig, runner: _Runner, fp: str | None, resume: bool, workdir: Path
) -> str | None:
    """What to do with checkpoints already in the output directory: continue them ("auto"), or
    remove them and start afresh (None). Work that could be resumed is never discarded silently."""
    from lmforge.components.pretrain.checkpointing import find_latest

    out, checkpoints = Path(cfg.output_dir), cfg.checkpoints_dir()
    latest = find_latest(checkpoints)
    if latest is None:
        return "auto" if resume else None
    if runner.overwrite:
        _discard(out, runner.log)
        return None
    # The newest recorded pretraining wrote what is on disk now (a reused one left it as it was).
    earlier = runner.record.earlier("pretrain")
    owner = earlier[0] if earlier else None
    ours = owner is not None and fp is not None and owner.get("fingerprint") == fp
    if resume:
        if ours or owner is None:
            runner.log(f"lmforge run: pretrain: resuming from {latest}")
            return "auto"
        raise UserError(
            f"--resume: the checkpoints in {checkpoints} belong to a pretraining with another config or "
            "other data; run without --resume to start afresh"
        )
    if ours and owner.get("status") not in DONE:
        raise UserError(
            f"pretraining in {out} did not finish (newest checkpoint: {latest.name}); pass --resume to "
            "continue it, or --overwrite to start afresh"
        )
    if ours:  # the same training finished, but its model directory is gone or was changed
        runner.log(f"lmforge run: pretrain: rebuilding the model from the final checkpoint {latest}")
        return "auto"
    if owner is not None or out.is_relative_to(workdir):
        _discard(out, runner.log)  # this run's own checkpoints, from an earlier config or data
        return None
    raise UserError(
        f"{checkpoints} holds checkpoints this run did not write; pass --resume to continue from them or "
        "--overwrite to replace them"
    )


def _discard(out: Path, log: Callable[[str], None]) -> None:
    log(f"lmforge run: pretrain: removing the checkpoints and model of an earlier pretraining in {out}")
    for sub in ("checkpoints", "model"):
        shutil.rmtree(out / sub, ignore_errors=True)


def _register(
    model_dir: Path, section: RegisterSection, tracking_uri: str, run_id: str | None
) -> dict[str, Any]:
    from lmforge.registry import RegistryClient

    version = RegistryClient(tracking_uri).register_model_dir(
        model_dir, section.model_name, alias=section.alias
    )
    return {
        "uri": f"models:/{section.model_name}@{section.alias}",
        "version": str(version.version),
        "source_run": run_id,
        "tracking_uri": tracking_uri,
    }


def _alias_unmoved(tracking_uri: str, earlier: dict[str, Any]) -> bool:
    """An earlier registration is reusable while its alias still names the version it created."""
    from lmforge.registry import RegistryClient

    return RegistryClient(tracking_uri).resolve(earlier["uri"]).version == earlier.get("version")


def _generate(model_dir: Path, section: GenerateSection) -> list[dict[str, Any]]:
    from lmforge.serving.textgen import generate_from_dir

    samples = []
    for i, prompt in enumerate(section.prompts):
        result = generate_from_dir(model_dir, prompt, section.sampling(i))
        samples.append({"prompt": prompt, "completion": result.text, "tokens": len(result.token_ids)})
    return samples
