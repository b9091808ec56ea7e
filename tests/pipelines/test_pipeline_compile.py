"""The Kubeflow pipeline without running it: the compiled IR YAML loads back with kfp and names every
stage with the project image; pipeline parameters override the config and a bad value fails before
anything runs; `lmforge pipeline upload|submit` call `kfp.Client` as documented. There is no KFP
backend on these machines, so the Client is a test double recording its calls (the only fake here);
the Ray Jobs submission of the training stages likewise talks to a recording stand-in for
`JobSubmissionClient` (a real one needs a Ray cluster with its dashboard/jobs server)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lmforge.cli import main
from lmforge.config import load, to_dict
from lmforge.errors import UserError
from lmforge.model.config import ConfigError
from lmforge.pipelines import steps
from lmforge.pipelines.config import LifecycleConfig
from lmforge.pipelines.local import _Console, _failure
from lmforge.pipelines.pipeline import compile_pipeline
from lmforge.pipelines.ray_jobs import RayJobFailed, run_stage_job
from lmforge.pipelines.remote import submit, upload

IMAGE = "registry.example.com/lmforge:1.2.3"
STAGES = {
    "resolve-config",
    "curate",
    "train-tokenizer",
    "tokenize",
    "pretrain",
    "import-base-model",
    "finetune",
    "quantize",
    "evaluate",
    "register",
    "promote",
    "deploy",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", IMAGE, gpus=2)
    return yaml.safe_load(path.read_text())


def test_compiled_pipeline_names_every_stage_with_the_project_image(compiled, tmp_path) -> None:
    from kfp import components

    executors = compiled["deploymentSpec"]["executors"]
    names = {
        e.removeprefix("exec-").rsplit("-", 1)[0] if e[-1].isdigit() else e.removeprefix("exec-")
        for e in executors
    }
    assert names == STAGES
    for spec in executors.values():
        container = spec["container"]
        assert container["image"] == IMAGE
        assert "pip install" not in " ".join(container["command"])  # no per-task install
    # training tasks ask for accelerators; data tasks retry
    for name in ("exec-pretrain", "exec-finetune"):
        accel = executors[name]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu" and accel["resourceCount"] == "2"
    assert "accelerator" not in executors["exec-curate"]["container"].get("resources", {})
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {
        "config",
        "inputs",
        "base_model",
        "max_steps",
        "lora_rank",
        "quantize_method",
        "eval_suite",
        "gate",
        "registry_name",
    } <= set(params)
    # the IR loads back with kfp
    file = tmp_path / "p.yaml"
    file.write_text(yaml.safe_dump(compiled))
    loaded = components.load_component_from_file(str(file))
    assert loaded.name == "lmforge"


def test_compiled_pipeline_branches_on_base_model_and_gate(compiled) -> None:
    text = json.dumps(compiled)
    assert "pipelinechannel--base_model" in text  # dsl.If(base_model == "") / dsl.Else
    assert "gate-passed" in text
    tasks = compiled["root"]["dag"]["tasks"]
    assert "retryPolicy" in tasks["curate"]
    assert tasks["curate"]["cachingOptions"].get("enableCache") is True


def test_compile_command_writes_yaml(tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "pipeline.yaml"
    assert main(["pipeline", "compile", "--output", str(out), "--image", IMAGE, "--gpus", "0"]) == 0
    spec = yaml.safe_load(out.read_text())
    assert all(e["container"]["image"] == IMAGE for e in spec["deploymentSpec"]["executors"].values())
    assert "accelerator" not in json.dumps(spec)
    assert "kfp run create" in capsys.readouterr().out


def test_cluster_env_wires_the_charts_configmap_and_s3_secret_into_every_task(tmp_path) -> None:
    """On a cluster every task reads the chart's `<release>-env` ConfigMap and the S3 Secret (by name:
    the compiled YAML must hold no credential value)."""
    out = tmp_path / "pipeline.yaml"
    argv = ["pipeline", "compile", "--output", str(out), "--image", IMAGE, "--gpus", "0"]
    assert main([*argv, "--env-configmap", "lmforge-env", "--s3-secret", "lmforge-s3"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 2  # the pipeline spec, then the Kubernetes platform spec
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    spec_executors = docs[0]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec_executors)  # every task
    for config in executors.values():
        (cm,) = config["configMapAsEnv"]
        assert cm["configMapName"] == "lmforge-env"
        assert {kv["configMapKey"] for kv in cm["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "LMFORGE_S3_ENDPOINT"}
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "lmforge-s3"
        assert {kv["envVar"] for kv in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # without the options the IR has no platform spec (kfp.local and plain clusters)
    assert main([*argv]) == 0
    assert len(list(yaml.safe_load_all(out.read_text()))) == 1


def test_compile_command_rejects_negative_gpus(tmp_path, capsys) -> None:
    assert main(["pipeline", "compile", "--output", str(tmp_path / "p.yaml"), "--gpus", "-1"]) == 2
    assert "--gpus" in capsys.readouterr().err


def test_pipeline_root_is_compiled_in_and_sent_with_the_run(repo_root, tmp_path, capsys) -> None:
    """A cluster run's artifacts go to MinIO/S3: the root is the compiled pipeline's default and the
    run's `pipeline_root` (the flag wins over the config's `pipeline_root`); a local folder is refused
    (kfp.local only)."""
    out = tmp_path / "pipeline.yaml"
    argv = ["pipeline", "compile", "--output", str(out), "--image", IMAGE]
    assert main([*argv, "--pipeline-root", "s3://lmforge-kfp/root/"]) == 0
    assert yaml.safe_load(out.read_text())["defaultPipelineRoot"] == "s3://lmforge-kfp/root"
    assert "pipeline root s3://lmforge-kfp/root" in capsys.readouterr().out
    assert main(argv) == 0 and "defaultPipelineRoot" not in yaml.safe_load(out.read_text())

    client = FakeClient()
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml", ["pipeline_root=s3://from-config/runs"])
    submit(cfg, "http://kfp", image=IMAGE, client=client)
    assert client.calls[-1][2]["pipeline_root"] == "s3://from-config/runs"
    assert client.packages[-1]["defaultPipelineRoot"] == "s3://from-config/runs"
    submit(cfg, "http://kfp", image=IMAGE, client=client, pipeline_root="minio://mlpipeline/lmforge")
    assert client.calls[-1][2]["pipeline_root"] == "minio://mlpipeline/lmforge"
    submit(
        load(LifecycleConfig, repo_root / "configs/demo.yaml", []), "http://kfp", image=IMAGE, client=client
    )
    assert client.calls[-1][2]["pipeline_root"] is None  # the backend's default

    for bad in ("/srv/kfp-root", "s3://", "http://minio:9000/bucket"):
        assert main([*argv, "--pipeline-root", bad]) == 2
        assert "expected s3://BUCKET/PREFIX" in capsys.readouterr().err
    calls = len(client.calls)
    with pytest.raises(UserError, match="pipeline root"):
        submit(cfg, "http://kfp", image=IMAGE, client=client, pipeline_root="relative/dir")
    assert len(client.calls) == calls  # refused before the backend is called


# ---- parameters over the config -------------------------------------------------------------------
def test_resolve_applies_parameters_and_splits_sections(repo_root) -> None:
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml")
    out = steps.resolve(
        json.dumps(to_dict(cfg)),
        inputs="a/b, s3://bucket/c",
        max_steps=70,
        lora_rank=4,
        quantize_method="int8",
        registry_name="bot",
    )
    assert json.loads(out["curate"])["inputs"] == ["a/b", "s3://bucket/c"]
    assert json.loads(out["pretrain"])["pretrain"]["schedule"]["max_steps"] == 70
    finetune = json.loads(out["finetune"])["finetune"]
    assert finetune["enabled"] is True and finetune["lora_rank"] == 4
    assert json.loads(out["quantize"])["quantize"]["method"] == "int8"
    assert json.loads(out["register"])["register"]["model_name"] == "bot"
    assert set(json.loads(out["tokenizer"])) == {"tokenizer"}  # a component sees only its sections


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize_method": "fp3"}, "quantize: method must be one of"),
        ({"gate": "g.yaml"}, "gate.rules needs evaluate.suite"),
        ({"max_steps": -2}, "pretrain"),
        ({"registry_name": "a/b"}, "model_name"),
    ],
)
def test_resolve_rejects_bad_parameters(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        steps.resolve("{}", **kwargs)


# ---- kfp.Client calls -------------------------------------------------------------------------------
class FakeClient:
    """Records kfp.Client calls; answers like KFP's API objects do (the attributes lmforge reads)."""

    def __init__(self, existing: str | None = None) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.existing = existing
        self.packages: list[dict] = []

    def _record(self, name, args, kwargs) -> None:
        self.calls.append((name, args, kwargs))
        self.packages.append(yaml.safe_load(Path(args[0]).read_text()) if args else {})

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", (name,), {}))
        return self.existing

    def upload_pipeline(self, *args, **kwargs):
        self._record("upload_pipeline", args, kwargs)
        return SimpleNamespace(pipeline_id="p-1")

    def upload_pipeline_version(self, *args, **kwargs):
        self._record("upload_pipeline_version", args, kwargs)
        return SimpleNamespace(pipeline_version_id="v-2")

    def create_run_from_pipeline_package(self, *args, **kwargs):
        self._record("create_run_from_pipeline_package", args, kwargs)
        return SimpleNamespace(run_id="r-9")


def test_upload_registers_then_adds_versions() -> None:
    fresh = FakeClient(existing=None)
    done = upload("http://kfp:8080", image=IMAGE, client=fresh)
    assert (done.pipeline_id, done.version_id) == ("p-1", None)
    name, _, kwargs = fresh.calls[-1]
    assert name == "upload_pipeline" and kwargs["pipeline_name"] == "lmforge"
    assert fresh.packages[-1]["pipelineInfo"]["name"] == "lmforge"

    again = FakeClient(existing="p-1")
    done = upload("http://kfp:8080", image=IMAGE, version="v2", client=again)
    name, _, kwargs = again.calls[-1]
    assert name == "upload_pipeline_version"
    assert kwargs == {"pipeline_version_name": "v2", "pipeline_id": "p-1", "description": None}
    assert done.version_id == "v-2"


def test_submit_sends_the_validated_config(repo_root) -> None:
    client = FakeClient()
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml", ["pretrain.schedule.max_steps=90"])
    done = submit(cfg, "https://kfp.example.com/", image=IMAGE, experiment="exp", client=client)
    name, _, kwargs = client.calls[-1]
    assert name == "create_run_from_pipeline_package"
    assert kwargs["experiment_name"] == "exp" and kwargs["run_name"] == "lmforge-demo"
    assert kwargs["enable_caching"] is True
    sent = json.loads(kwargs["arguments"]["config"])
    assert sent["pretrain"]["schedule"]["max_steps"] == 90 and sent["inputs"] == ["data/sample/python-docs"]
    images = {e["container"]["image"] for e in client.packages[-1]["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    assert done.url == "https://kfp.example.com/#/runs/details/r-9"


def test_submit_rejects_a_bad_config_before_calling_the_backend(repo_root) -> None:
    client = FakeClient()
    cfg = load(LifecycleConfig, repo_root / "configs/demo.yaml", ["pretrain.data.seq_len=0"])
    with pytest.raises(ConfigError, match="pretrain"):
        submit(cfg, "http://kfp", image=IMAGE, client=client)
    assert client.calls == []


def test_submit_command_rejects_a_host_that_is_no_url(repo_root, capsys) -> None:
    code = main(["pipeline", "submit", "--host", "kfp", "--config", str(repo_root / "configs/demo.yaml")])
    assert code == 2 and "--host 'kfp'" in capsys.readouterr().err


# ---- Ray Jobs submission of the training stages -------------------------------------------------
class FakeJobs:
    def __init__(self, status: str, message: str = "") -> None:
        self.status, self.message, self.submitted = status, message, {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs["submission_id"]

    async def tail_job_logs(self, job_id):
        for chunk in ["step 1\n", "step 2\n"]:
            yield chunk

    def get_job_info(self, job_id):
        return SimpleNamespace(status=self.status, message=self.message)


def test_ray_job_streams_logs_and_succeeds(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    jobs, seen = FakeJobs("SUCCEEDED"), []
    job_id = run_stage_job("pretrain", {"output_dir": "x"}, tmp_path, client=jobs, log=seen.append)
    assert job_id.startswith("lmforge-pretrain-")
    assert "python -m lmforge.pipelines.ray_jobs pretrain" in jobs.submitted["entrypoint"]
    assert jobs.submitted["runtime_env"] == {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}
    assert seen[1:] == ["step 1\n", "step 2\n"]
    assert json.loads((tmp_path / "pretrain-job-config.json").read_text()) == {"output_dir": "x"}


def test_ray_job_failure_carries_the_jobs_error(tmp_path) -> None:
    jobs = FakeJobs("FAILED", "Job entrypoint command failed with exit code 1: CUDA out of memory")
    with pytest.raises(RayJobFailed, match="pretrain: Ray job .* FAILED: .*CUDA out of memory"):
        run_stage_job("pretrain", {}, tmp_path, client=jobs, log=lambda _: None)
    assert issubclass(RayJobFailed, UserError)


# ---- the local runner's progress and failure lines ----------------------------------------------
def test_console_turns_kfp_events_into_progress_and_statuses(tmp_path) -> None:
    import io

    said, log_file = [], io.StringIO()
    console = _Console(io.StringIO(), log_file, said.append, verbose=False)
    console.write("20:04:18.384 - INFO - Executing task \x1b[96m'curate'\x1b[0m\n    some output\n")
    console.write(
        "20:04:20.000 - INFO - Task \x1b[96m'curate'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
    )
    console.write("20:04:21.000 - INFO - Task train-tokenizer cache hit (key=abc); skipping execution.\n")
    console.write("20:04:22.000 - INFO - Executing task 'tokenize'\n")
    console.write(
        "    Traceback (most recent call last):\n    lmforge.errors.UserError: no documents in data/train\n"
    )
    console.write("20:04:23.000 - ERROR - Task 'tokenize' finished with status FAILURE\n")
    assert {k: v["status"] for k, v in console.steps.items()} == {
        "curate": "ran",
        "train-tokenizer": "reused",
        "tokenize": "failed",
    }
    assert said[0] == "lmforge run: curate ..." and any("reused" in s for s in said)
    assert console.failed == ["tokenize"]
    assert (
        _failure("tokenize", console.lines)
        == "pipeline stage 'tokenize' failed: UserError: no documents in data/train"
    )
    assert "some output" in log_file.getvalue()


def test_local_run_checks_the_pipeline_files_before_anything_runs(repo_root, tmp_path, monkeypatch) -> None:
    from lmforge.errors import InputNotFoundError
    from lmforge.pipelines.local import run_pipeline_locally

    monkeypatch.chdir(tmp_path)
    cfg = load(
        LifecycleConfig,
        repo_root / "configs/demo.yaml",
        [f"workdir={tmp_path / 'work'}", f"inputs=[{repo_root / 'data/sample/python-docs/tutorial'}]"],
    )
    with pytest.raises(InputNotFoundError, match="evaluate.suite: configs/eval-demo.yaml does not exist"):
        run_pipeline_locally(cfg, log=lambda _: None)
    assert not (tmp_path / "work").exists()
