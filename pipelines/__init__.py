"""Kubeflow Pipelines: the lifecycle DAG, compiled for a KFP backend or run locally with kfp.local."""
