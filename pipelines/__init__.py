"""Wiring of the stages: the Kubeflow pipeline (`pipeline.py`: components in `components.py` over
the plain functions in `steps.py`; `local.py` runs it through kfp.local for `lmforge run`,
`remote.py` on a Kubeflow Pipelines backend), with its config (`config.py`) and the run record
`lmforge run` keeps in its workdir (`run_record.py`)."""

DEFAULT_IMAGE = "ghcr.io/lmforge/lmforge:0.1.0"  # the project image the components run in
