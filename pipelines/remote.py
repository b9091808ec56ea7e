"""The pipeline on a Kubeflow Pipelines backend: upload it (and new versions), start runs, through
`kfp.Client`.

    upload("https://kfp.example.com", image="registry.example.com/lmforge:0.1.0")
    submit(cfg, "https://kfp.example.com", experiment="lmforge")

Both compile the pipeline for the given image first. `submit` passes the run's config (validated
here, paths left as written: they are read inside the cluster's containers) as the pipeline's
`config` parameter. `client` lets a caller pass its own `kfp.Client` (authentication, namespace,
or a test double).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import to_dict
from lmforge.errors import UserError
from lmforge.pipelines.config import LifecycleConfig

DEFAULT_EXPERIMENT = "lmforge"


@dataclass
class Uploaded:
    pipeline_id: str
    version_id: str | None  # None: the first upload (the pipeline's initial version)
    name: str


@dataclass
class Submitted:
    run_id: str
    url: str  # the run in the Kubeflow UI


def make_client(host: str, client: Any = None) -> Any:
    if client is not None:
        return client
    if not host.startswith(("http://", "https://")):
        raise UserError(f"--host {host!r}: expected the Kubeflow Pipelines URL, http(s)://HOST[:PORT]")
    import kfp

    return kfp.Client(host=host)


def _compiled(image: str, folder: str, **options: Any) -> str:
    from lmforge.pipelines.pipeline import compile_pipeline

    return str(compile_pipeline(Path(folder) / "pipeline.yaml", image, **options))


def upload(
    host: str,
    *,
    image: str,
    name: str = "lmforge",
    version: str | None = None,
    description: str | None = None,
    client: Any = None,
    **options: Any,
) -> Uploaded:
    """Register the pipeline under `name`; when it exists, add a version (named `version`, default:
    the lmforge code version and a timestamp) so the UI offers the new one."""
    import time

    from lmforge.pipelines.steps import code_version

    client = make_client(host, client)
    with tempfile.TemporaryDirectory() as tmp:
        package = _compiled(image, tmp, **options)
        existing = client.get_pipeline_id(name)
        if existing is None:
            made = client.upload_pipeline(package, pipeline_name=name, description=description)
            return Uploaded(made.pipeline_id, None, name)
        label = version or f"{code_version()}-{time.strftime('%Y%m%d-%H%M%S')}"
        made = client.upload_pipeline_version(
            package, pipeline_version_name=label, pipeline_id=existing, description=description
        )
        return Uploaded(existing, made.pipeline_version_id, name)


def submit_arguments(cfg: LifecycleConfig) -> dict[str, Any]:
    """The pipeline's arguments for a cluster run: the validated config, paths as written."""
    cfg.check_pipeline_sections()
    cfg.pretrain_config()  # the pretraining section validated too, before anything is sent
    return {"config": json.dumps(to_dict(cfg), sort_keys=True)}


def submit(
    cfg: LifecycleConfig,
    host: str,
    *,
    image: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    caching: bool = True,
    client: Any = None,
    **options: Any,
) -> Submitted:
    """Start a run of the pipeline with this config on the backend at `host`. Its artifacts go to
    `pipeline_root` (an option, else the config's `pipeline_root`, else the backend's default)."""
    arguments = submit_arguments(cfg)
    root = options.get("pipeline_root") or cfg.pipeline_root or ""
    if root:
        from lmforge.pipelines.pipeline import check_pipeline_root

        options = {**options, "pipeline_root": check_pipeline_root(root)}
    client = make_client(host, client)
    with tempfile.TemporaryDirectory() as tmp:
        package = _compiled(image, tmp, **options)
        result = client.create_run_from_pipeline_package(
            package,
            arguments=arguments,
            run_name=run_name or f"{cfg.register.model_name}",
            experiment_name=experiment,
            enable_caching=caching,
            pipeline_root=options.get("pipeline_root") or None,
        )
    return Submitted(result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}")
