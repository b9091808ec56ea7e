"""The project image, built here for real and run: the containerized path users get on a cluster.

The module builds the image once with scripts/build_image.sh (a local debootstrapped base image, the
local torch wheel, the engine's layer cache: a rebuild after a code change takes only the last layer),
then checks that
  - `docker run IMAGE --help` is `lmforge --help`, the process runs as uid 10001 (not root), the
    OCI labels, healthcheck and user are set, and no CA bundle or pip cache stayed in the image;
  - a two-task Kubeflow pipeline runs with kfp's `DockerRunner`, each task a container of the image:
    lmforge's tokenizer stage trains on the bundled sample, the next task loads its output artifact;
  - the pipeline's own components (`lmforge.pipelines.components.build(image)`: resolve-config,
    curate, train-tokenizer, tokenize) run the same way, each in a container of the image.
The Docker engine is $DOCKER_HOST if it answers, else the private one scripts/docker_engine.sh starts
(installing docker.io as root); only where none can be started do these tests skip, with the reason.
"""

# no `from __future__ import annotations`: kfp reads the components' annotations as types
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

# the first build on a new machine (base image, torch, dependencies) takes minutes: more than the
# suite's per-test timeout; later builds reuse the engine's cache (.ci/run builds before pytest)
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3000)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("LMFORGE_TEST_IMAGE", "lmforge:test")
SAMPLE = REPO / "data" / "sample" / "python-docs" / "tutorial"
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def docker_host() -> str:
    """DOCKER_HOST of an engine that answers (the running one, or a private one started now)."""
    host = os.environ.get("DOCKER_HOST")
    if host and shutil.which(DOCKER) and docker("version", timeout=30).returncode == 0:
        return host
    started = subprocess.run(
        [str(REPO / "scripts" / "docker_engine.sh")], capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or [f"exit status {started.returncode}"])[-1]
        pytest.skip(f"no Docker engine can be started here: {reason}")
    host = started.stdout.strip().removeprefix("export DOCKER_HOST=")
    os.environ["DOCKER_HOST"] = host  # for the docker CLI and kfp's DockerRunner (docker.from_env)
    return host


@pytest.fixture(scope="module")
def image(docker_host: str) -> str:
    built = subprocess.run(
        [str(REPO / "scripts" / "build_image.sh")],
        env=dict(os.environ, IMAGE=IMAGE, DOCKER_HOST=docker_host),
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert built.returncode == 0, f"image build failed:\n{built.stdout[-3000:]}\n{built.stderr[-6000:]}"
    return IMAGE


def test_help_non_root_labels(image: str) -> None:
    helped = docker("run", "--rm", image, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: lmforge") and "pretrain" in helped.stdout

    # a program on PATH runs as given (KFP's `sh -c`, `ray start`); everything runs as lmforge
    ids = docker("run", "--rm", image, "sh", "-c", "id -u; id -g; echo $HOME; ray --version; python3 -V")
    assert ids.returncode == 0, ids.stderr
    uid, gid, home, ray_version, python = ids.stdout.strip().splitlines()
    assert (uid, gid, home) == ("10001", "10001", "/workspace") and uid != "0"
    assert "ray" in ray_version and python.startswith("Python 3.11")

    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "lmforge"
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["entrypoint.sh"]
    assert config["Healthcheck"]["Test"] == ["CMD", "healthcheck.sh"]
    assert not any(e.startswith(("PIP_CERT=", "SSL_CERT_FILE=")) for e in config["Env"])

    # the build secret and pip's cache were mounts: nothing of them in the image; the healthcheck
    # of a container that is not a server reports healthy
    left = docker(
        "run",
        "--rm",
        image,
        "sh",
        "-c",
        "ls /run/secrets /root/.cache/pip /wheels 2>/dev/null | wc -l; healthcheck.sh && echo healthy",
    )
    assert left.stdout.split() == ["0", "healthy"], left.stdout + left.stderr


def test_kfp_pipeline_runs_in_the_image(image: str, tmp_path: Path) -> None:
    from kfp import dsl, local

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def train_tokenizer_op(corpus_dir: str, vocab_size: int, tokenizer: dsl.Output[dsl.Model]) -> None:
        from pathlib import Path

        from lmforge.components.tokenizer import train_tokenizer

        train_tokenizer(
            [Path(corpus_dir)],
            tokenizer.path,
            vocab_size=vocab_size,
            holdout_fraction=0.0,
            reference_tokenizers=[],
        )

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def encode_op(tokenizer: dsl.Input[dsl.Model], text: str) -> str:
        import json
        import os

        from lmforge.tokenizer_files import load_tokenizer

        ids = load_tokenizer(tokenizer.path).encode(text).ids
        return json.dumps({"ids": ids, "uid": os.getuid()})

    @dsl.pipeline(name="lmforge-image-smoke")
    def smoke(corpus_dir: str, text: str) -> str:
        trained = train_tokenizer_op(corpus_dir=corpus_dir, vocab_size=300)
        return encode_op(tokenizer=trained.outputs["tokenizer"], text=text).output

    # DockerRunner mounts pipeline_root at the same path; the container's user (10001) writes there
    root = tmp_path / "kfp"
    shutil.copytree(SAMPLE, root / "corpus")
    for d in (tmp_path, root):
        d.chmod(0o777)
    local.init(runner=local.DockerRunner(), pipeline_root=str(root))
    text = "Python's for statement iterates over the items of any sequence."
    run = smoke(corpus_dir=str(root / "corpus"), text=text)

    out = json.loads(run.output)
    assert out["uid"] == 10001
    # the artifact the first container wrote is a working tokenizer: the host decodes the same text
    tokenizer_json = sorted(root.glob("lmforge-image-smoke-*/train-tokenizer-op/tokenizer/tokenizer.json"))
    assert tokenizer_json, sorted(str(p) for p in root.rglob("*"))[:50]
    from lmforge.tokenizer_files import load_tokenizer

    host = load_tokenizer(tokenizer_json[-1])
    assert host.encode(text).ids == out["ids"] and host.decode(out["ids"]) == text
    assert tokenizer_json[-1].stat().st_uid == 10001


def test_project_components_run_in_the_image(image: str, tmp_path: Path) -> None:
    """The pipeline's own components (`lmforge.pipelines.components.build(image)`), each a container
    of the image: resolve the config, curate the sample, train the tokenizer, tokenize."""
    from kfp import dsl, local

    from lmforge.config import load, to_dict
    from lmforge.pipelines import components
    from lmforge.pipelines.config import LifecycleConfig

    root = tmp_path / "kfp"  # the only host folder the containers see (at the same path)
    shutil.copytree(SAMPLE, root / "corpus")
    for name in ("eval-demo.yaml", "gate-demo.yaml"):
        shutil.copy(REPO / "configs" / name, root / name)
    for d in (tmp_path, root):
        d.chmod(0o777)
    cfg = load(
        LifecycleConfig,
        REPO / "configs" / "demo.yaml",
        [
            f"workdir={root / 'work'}",
            f"inputs=[{root / 'corpus'}]",
            "tokenizer.vocab_size=400",
            "curate.split.validation=0.25",
            f"evaluate.suite={root / 'eval-demo.yaml'}",
            f"gate.rules={root / 'gate-demo.yaml'}",
        ],
    )
    c = components.build(image)

    @dsl.pipeline(name="lmforge-image-stages")
    def stages(config: str):
        r = c.resolve_config(
            config=config, inputs="", base_model="", max_steps=0, lora_rank=0, quantize_method="",
            eval_suite="", gate="", registry_name="",
        )  # fmt: skip
        curated = c.curate(config=r.outputs["curate"], inputs_digest="")
        tok = c.train_tokenizer(config=r.outputs["tokenizer"], data=curated.outputs["data"])
        c.tokenize(data=curated.outputs["data"], tokenizer=tok.outputs["tokenizer"])

    local.init(runner=local.DockerRunner(), pipeline_root=str(root))
    stages(config=json.dumps(to_dict(cfg)))

    run = sorted(root.glob("lmforge-image-stages-*"))[-1]
    tokenizer_json = run / "train-tokenizer" / "tokenizer" / "tokenizer.json"
    index = json.loads((run / "tokenize" / "shards" / "index.json").read_text())
    assert tokenizer_json.stat().st_uid == 10001 and index
    assert (run / "curate" / "data" / "datacard.json").is_file()
    assert sorted(p.name for p in (run / "tokenize" / "shards").glob("train-*.bin"))
