"""Where MLflow lives, decided in one place for every stage (pretraining, registry, serving).

Embedded default: an sqlite database at ./.lmforge/mlflow.db with artifacts in a folder beside it
(without an explicit artifact location MLflow would scatter them into ./mlruns of whatever
directory a process happens to run in). On a cluster `MLFLOW_TRACKING_URI` names the server and the
server decides where artifacts go.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_HOME = ".lmforge"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite under ./.lmforge (absolute, so Ray workers agree)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(DEFAULT_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """A folder beside an sqlite database; None (the server's own setting) for anything else."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment `name`, created (with artifacts under `artifact_root`) if missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    location = f"{artifact_root.rstrip('/')}/{safe}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)
