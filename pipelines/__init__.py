"""Wiring of the stages into a lifecycle: `lifecycle.run_lifecycle` (behind `lmforge run`), its config
and its run record. The Kubeflow Pipelines DAG over the same stage functions is coming."""
