"""Wiring of the stages: the Kubeflow pipeline (`pipeline.py`: components in `components.py` over
the plain functions in `steps.py`; `local.py` runs it through kfp.local, `remote.py` on a Kubeflow
Pipelines backend) and the in-process sequence behind `lmforge run` (`lifecycle.py`), with their
config (`config.py`) and run record (`run_record.py`)."""

DEFAULT_IMAGE = "ghcr.io/lmforge/lmforge:0.1.0"  # the project image the components run in
