"""`lmforge run`: the same `@dsl.pipeline` the cluster runs, on this machine through `kfp.local`.

    result = run_pipeline_locally(cfg, log=print)          # resume=True, overwrite=True: the flags

`kfp.local.SubprocessRunner(use_venv=False)` runs each component as a subprocess of this Python
(the installed lmforge, no image, no pip step); artifacts land under `<workdir>/kfp/<run>/<task>/`.
Re-running reuses unchanged steps through kfp.local's task cache (`<workdir>/kfp-cache`, keyed on a
task's arguments, which hold its config sections, the upstream artifacts' locations and, for
curation, the content hash of the input files): a changed section re-runs its step, whose new
outputs re-run every step after it. `overwrite=True` runs everything afresh (and removes
`<workdir>/pretrain/`). Pretraining keeps its checkpoints at `<workdir>/pretrain/<key>/` (see
`steps.pretrain`): an interrupted pretraining is continued with `resume=True` (`lmforge run --resume`).

Records: `<workdir>/run.json` is the last run that succeeded (tasks, MLflow parent run, registered
model, sample generations), replaced only by another success; `<workdir>/run.partial.json` the run
in progress or the last one that failed (with its error). The samples are generated at the end, in
this process, from the registered model (the promoted alias when the gate passed).

Tracking: one MLflow parent run per pipeline run is opened here, and every stage nests its run
under it (see `steps.py`). Ray starts in-process inside the training components, as
`lmforge pretrain` does. What kfp.local does not do that a cluster does: accelerators, resource
requests and pod settings are ignored; retries are set to 0 here (a local failure is not
transient).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import to_dict
from lmforge.errors import InputNotFoundError, UserError
from lmforge.pipelines.config import LifecycleConfig
from lmforge.pipelines.run_record import RunRecord, file_sha256

LOCAL_IMAGE = "lmforge-local"  # never pulled: SubprocessRunner runs in this interpreter
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EVENT = re.compile(  # kfp.local's log lines for a task starting, reused from its cache, finishing
    r"- (?:Executing task '?(?P<start>[\w-]+)'?"
    r"|Task '?(?P<done>[\w-]+)'? finished with status (?P<status>\w+)"
    r"|Task '?(?P<hit>[\w-]+)'? cache hit)"
)


class StageFailed(UserError):
    """A pipeline stage failed: names the stage and its error."""


@dataclass
class LocalRun:
    workdir: Path
    run_dir: Path  # <workdir>/kfp/<pipeline run>: one folder per task, holding its artifacts
    pipeline_run_id: str
    mlflow_run_id: str
    tracking_uri: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> status, seconds
    seconds: float = 0.0
    registered: str | None = None  # models:/NAME@ALIAS: the promoted alias, else register.alias
    version: str | None = None  # the version that alias names
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, completion, tokens
    record_path: Path | None = None  # <workdir>/run.json

    def artifact(self, task: str, name: str) -> Path | None:
        """Where task `task`'s output `name` is: in this run, or for a task reused from the cache, in
        the newest earlier run that ran it (None: nowhere)."""
        runs = [self.run_dir, *sorted(self.run_dir.parent.glob("lmforge-*"), reverse=True)]
        return next((r / task / name for r in runs if (r / task / name).exists()), None)


class _Console(io.TextIOBase):
    """Stands in for stdout while kfp.local runs (it prints its task events and the tasks' output
    there): everything goes to the log file (and to the console with `verbose`), the task events
    become progress lines and step statuses, and the last lines are kept to name a failure's cause."""

    def __init__(self, inner, log_file, log: Callable[[str], None], verbose: bool) -> None:
        self.inner, self.file, self.log, self.verbose = inner, log_file, log, verbose
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.steps: dict[str, dict[str, Any]] = {}
        self.started: dict[str, float] = {}
        self.failed: list[str] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.verbose:
            self.inner.write(text)
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self._line(_ANSI.sub("", line).strip())
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.inner.flush()

    def _line(self, line: str) -> None:
        if line:
            self.lines.append(line)
        match = _EVENT.search(line)
        if not match:
            return
        if match["start"]:
            self.started[match["start"]] = time.perf_counter()
            self._say(f"lmforge run: {match['start']} ...")
        elif match["hit"]:
            self.steps[match["hit"]] = {"status": "reused"}
            self._say(f"lmforge run: {match['hit']}: unchanged since an earlier run, reused")
        else:
            name = match["done"]
            seconds = round(time.perf_counter() - self.started.get(name, time.perf_counter()), 2)
            ok = match["status"] == "SUCCESS"
            self.steps[name] = {"status": "ran" if ok else "failed", "seconds": seconds}
            if not ok:
                self.failed.append(name)
            self._say(f"lmforge run: {name} {'done' if ok else 'FAILED'} in {seconds} s")

    def _say(self, message: str) -> None:
        if not self.verbose:
            self.log(message)


def pipeline_arguments(cfg: LifecycleConfig, base: Path | None = None) -> dict[str, Any]:
    """The pipeline's arguments for a config: the config as JSON, its relative paths made absolute
    (the components may run elsewhere), and the input files' content hash."""
    base = base or Path.cwd()

    def absolute(p: str | None) -> str | None:
        if p is None or str(p).startswith(("s3://", "models:/")) or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    data = to_dict(cfg)
    data["inputs"] = [absolute(i) for i in data["inputs"]]
    data["workdir"] = absolute(data["workdir"])
    data["evaluate"]["suite"] = absolute(data["evaluate"]["suite"])
    data["gate"]["rules"] = absolute(data["gate"]["rules"])
    data["finetune"]["config"] = absolute(data["finetune"]["config"])
    return {"config": json.dumps(data, sort_keys=True), "inputs_digest": inputs_digest(cfg)}


def _check_files(cfg: LifecycleConfig) -> None:
    """The files only the pipeline reads (suite, gate, finetune config) exist, before anything runs."""
    named = {
        "evaluate.suite": cfg.evaluate.suite,
        "gate.rules": cfg.gate.rules,
        "finetune.config": cfg.finetune.config,
    }
    for field_name, path in named.items():
        if path and not str(path).startswith("s3://") and not Path(path).is_file():
            raise InputNotFoundError(
                f"{field_name}: {path} does not exist (relative paths are read from {Path.cwd()})"
            )


def inputs_digest(cfg: LifecycleConfig) -> str:
    """SHA-256 over every input file as curation lists it ("" with s3:// inputs: not compared)."""
    from lmforge.components.curate.readers import list_sources

    if any(str(i).startswith("s3://") for i in cfg.inputs):
        return ""
    digest = hashlib.sha256()
    for src in list_sources(cfg.inputs, cfg.curate).sources:
        digest.update(f"{src.input_index} {src.doc_id} {file_sha256(Path(src.uri))}\n".encode())
    return digest.hexdigest()


def run_pipeline_locally(
    cfg: LifecycleConfig,
    *,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    resume: bool = False,
    base_model: str = "",
    verbose: bool = False,
    samples: bool = True,
) -> LocalRun:
    """Run the pipeline with kfp.local; raises StageFailed naming the failed stage and its error.
    The console gets one line per stage event; kfp.local's full log (every task's output) goes to
    <workdir>/pipeline.log, and to the console as well with `verbose`. `resume` continues an
    interrupted pretraining; `overwrite` runs every task afresh; `samples`: generate the config's
    `generate.prompts` from the registered model at the end."""
    from kfp import local

    from lmforge.components.curate.config import public_dict
    from lmforge.pipelines import steps
    from lmforge.pipelines.pipeline import build_pipeline
    from lmforge.tracking import default_tracking_uri

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass one of them")
    cfg.check()  # every section validated, inputs present, before anything runs
    cfg.check_pipeline_sections()
    _check_files(cfg)
    start = time.perf_counter()
    work = Path(cfg.workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    args = pipeline_arguments(cfg)
    tracking_uri = default_tracking_uri()
    pipeline_run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    record = RunRecord(work, {**to_dict(cfg), "curate": public_dict(cfg.curate)})
    record.data["pipeline_run_id"] = pipeline_run_id
    record.save()
    if overwrite:  # the pretraining checkpoints outlive the task cache: start those afresh too
        shutil.rmtree(work / "pretrain", ignore_errors=True)
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "LMFORGE_PIPELINE_RUN_ID": pipeline_run_id}
    env["LMFORGE_PRETRAIN_RESUME"] = "1" if resume else ""
    saved = {k: os.environ.get(k) for k in [*env, "LMFORGE_MLFLOW_PARENT_RUN"]}
    os.environ.update(env)
    parent = steps.start_tracking(args["config"], pipeline_run_id, "lmforge")
    os.environ["LMFORGE_MLFLOW_PARENT_RUN"] = parent
    record.data.update(mlflow_run_id=parent, tracking_uri=tracking_uri)

    root = work / "kfp"
    before = set(root.glob("lmforge-*")) if root.is_dir() else set()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=False,
        enable_caching=not overwrite,
        cache_root=str(work / "kfp-cache"),
    )
    log_path = work / "pipeline.log"
    log(f"lmforge run: pipeline run {pipeline_run_id}; full log in {log_path}")
    status, stdout = "FAILED", sys.stdout
    events = _Console(stdout, io.StringIO(), log, verbose)
    try:
        with open(log_path, "w", encoding="utf-8") as log_file, warnings.catch_warnings():
            # kfp.local warns that a non-Python image name runs in this interpreter: that is the intent
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            # ... and that resource requests mean nothing here (the README lists what kfp.local ignores)
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            sys.stdout = events = _Console(stdout, log_file, log, verbose)
            # kfp.local logs a cache hit outside its own log context, at INFO: catch it here
            root_logger, hits = logging.getLogger(), logging.StreamHandler(events)
            hits.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
            level = root_logger.level
            root_logger.setLevel(logging.INFO)
            root_logger.addHandler(hits)
            try:
                build_pipeline(LOCAL_IMAGE, gpus=0, retries=0)(base_model=base_model, **args)
                if events.failed:
                    raise StageFailed(_failure(events.failed[0], events.lines))
                status = "FINISHED"
            finally:
                root_logger.removeHandler(hits)
                root_logger.setLevel(level)
                sys.stdout = stdout
                steps.finish_tracking(parent, status)
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        new = sorted(set(root.glob("lmforge-*")) - before)
        result = LocalRun(
            workdir=work,
            run_dir=new[-1] if new else root,
            pipeline_run_id=pipeline_run_id,
            mlflow_run_id=parent,
            tracking_uri=tracking_uri,
            steps=events.steps,
            record_path=record.path,
        )
        record.data.update(run_dir=str(result.run_dir), steps=result.steps)
        result.registered, result.version = registered_model(cfg, tracking_uri)
        if samples and result.registered:
            log(f"lmforge run: generating samples from {result.registered} ...")
            result.samples = generate_samples(cfg, result.registered, tracking_uri)
        result.seconds = round(time.perf_counter() - start, 2)
        record.data.update(
            registered=result.registered,
            registered_version=result.version,
            samples=result.samples,
            seconds=result.seconds,
        )
    except KeyboardInterrupt:
        record.data["steps"] = events.steps
        record.finish("interrupted", "interrupted by the user")
        raise
    except BaseException as err:
        record.data["steps"] = events.steps
        record.finish("failed", str(err))
        raise
    record.finish("succeeded")
    return result


def registered_model(cfg: LifecycleConfig, tracking_uri: str) -> tuple[str | None, str | None]:
    """`models:/NAME@ALIAS` for the run's model (the version `register.alias` names): the promoted
    alias when it names that version too (the gate passed), else the registration alias; (None,
    None) when nothing is registered."""
    from lmforge.registry import RegistryClient, RegistryError

    name = cfg.register.model_name
    try:
        aliases = {k: str(v) for k, v in RegistryClient(tracking_uri).aliases(name).items()}
    except RegistryError:
        return None, None
    version = aliases.get(cfg.register.alias)
    if version is None:
        return None, None
    promoted = cfg.gate.promote_alias
    alias = promoted if aliases.get(promoted) == version else cfg.register.alias
    return f"models:/{name}@{alias}", version


def generate_samples(cfg: LifecycleConfig, model: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Continue each of `generate.prompts` with the registered model (fetched from the registry,
    as `lmforge serve --model` does)."""
    from lmforge.registry import RegistryClient
    from lmforge.serving.textgen import generate_from_dir

    registry = RegistryClient(tracking_uri)
    model_dir = registry.download(registry.resolve(model))
    out = []
    for i, prompt in enumerate(cfg.generate.prompts):
        result = generate_from_dir(model_dir, prompt, cfg.generate.sampling(i))
        out.append({"prompt": prompt, "completion": result.text, "tokens": len(result.token_ids)})
    return out


_ERROR_LINE = re.compile(
    r"^(?:[\w.]+\.)?(?P<kind>[A-Z]\w*(?:Error|Exception|Failed|Interrupt)\w*): (?P<msg>.+)$"
)


def _failure(task: str, lines: Iterable[str]) -> str:
    """`pipeline stage X failed: <its error>`, the error being the last exception line it printed."""
    cause = next((m for line in reversed(list(lines)) if (m := _ERROR_LINE.match(line))), None)
    why = f"{cause['kind']}: {cause['msg']}" if cause else "see its log above"
    return f"pipeline stage {task!r} failed: {why}"
