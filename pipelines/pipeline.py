"""The lmforge KFP v2 pipeline: every stage as a component, wired; compile it to IR YAML.

    resolve-config -> curate -> tokenizer -> tokenize -> pretrain -----> finetune -> quantize -> evaluate
                    (base_model given, dsl.Else: import-base-model)                          |
                                                                  register (alias register.alias)
                                                                  dsl.If(gate passed): promote -> deploy

The same function runs on a Kubeflow Pipelines backend (compiled YAML, `lmforge pipeline
upload|submit`, `kfp run create`) and on this machine through `kfp.local` (`pipelines/local.py`).
Finetune and quantize pass the model through unchanged when their config section switches them
off, so the graph is the same for every config. Pipeline parameters override the config (a
non-empty / non-zero value wins); `config` is the resolved `lmforge run` YAML as JSON.
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import compiler, dsl

from lmforge.pipelines import DEFAULT_IMAGE, components

PIPELINE_NAME = "lmforge"
TRAINING = ("pretrain", "finetune")  # the tasks that get accelerators and big resource requests
# Keys of the chart's `<release>-env` ConfigMap (charts/lmforge/templates/configmap-env.yaml) every task
# reads on a cluster: where MLflow, S3/MinIO, the KubeRay cluster and the server are. Optional keys:
# a chart without training cluster or serving leaves them out.
CLUSTER_ENV_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "LMFORGE_S3_ENDPOINT",
    "AWS_DEFAULT_REGION",
    "RAY_ADDRESS",
    "LMFORGE_SERVING_URL",
    "LMFORGE_RAYSERVICE",
)
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # the chart's s3.existingSecret


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    *,
    gpus: int = 1,
    accelerator: str = "nvidia.com/gpu",
    retries: int = 2,
    cpu: str = "4",
    memory: str = "16G",
    env_config_map: str = "",
    s3_secret: str = "",
    pipeline_root: str = "",
) -> Callable[..., Any]:
    """The @dsl.pipeline for `image`. Training tasks request `gpus` accelerators of type `accelerator`
    (0: none), `cpu` and `memory`; data tasks retry `retries` times; everything but promotion is
    cached on its inputs. On a cluster, `env_config_map` (the chart's `<release>-env`) and `s3_secret`
    (its `s3.existingSecret`) become every task's environment (kfp-kubernetes), so the tasks track to
    the cluster's MLflow, write to its MinIO and train on its KubeRay cluster; credentials stay in the
    Secret (the compiled YAML names it, never its values). kfp.local ignores both. `pipeline_root`
    (s3://BUCKET/PREFIX, minio://..., gs://...; see `check_pipeline_root`) becomes the compiled
    pipeline's default root: where the backend stores every task's output artifacts."""
    c = components.build(image)
    root = check_pipeline_root(pipeline_root) if pipeline_root else None

    def settings(task, name: str, cache: bool = True):
        task.set_caching_options(cache)
        if env_config_map or s3_secret:
            from kfp import kubernetes

            if env_config_map:
                kubernetes.use_config_map_as_env(
                    task, env_config_map, {key: key for key in CLUSTER_ENV_KEYS}, optional=False
                )
            if s3_secret:
                kubernetes.use_secret_as_env(task, s3_secret, {key: key for key in S3_SECRET_KEYS})
        if name in TRAINING:
            task.set_cpu_request(cpu).set_memory_request(memory)
            if gpus > 0:
                task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
        if name not in ("register", "promote", "deploy"):
            task.set_retry(retries)
        return task

    def after_model(cfg, data, model) -> None:
        """finetune -> quantize -> evaluate -> register -> (gate passed) promote -> deploy."""
        tuned = settings(c.finetune(config=cfg.outputs["finetune"], model=model), "finetune")
        quant = settings(
            c.quantize(
                config=cfg.outputs["quantize"], model=tuned.outputs["tuned"], data=data.outputs["data"]
            ),
            "quantize",
        )
        final = quant.outputs["quantized"]
        evaluation = settings(
            c.evaluate(config=cfg.outputs["evaluate"], model=final, data=data.outputs["data"]), "evaluate"
        )
        registered = settings(
            c.register(
                config=cfg.outputs["register"],
                model=final,
                evaluation=evaluation.outputs["results"],
                metrics=evaluation.outputs["metrics"],
            ),
            "register",
        )
        with dsl.If(evaluation.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
            promoted = settings(
                c.promote(config=cfg.outputs["register"], version=registered.output), "promote", False
            )
            settings(c.deploy(model_uri=promoted.output, version=registered.output), "deploy", False)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        pipeline_root=root,
        description="lmforge: curate -> tokenizer -> tokenize -> pretrain (or a base model) -> finetune -> "
        "quantize -> evaluate -> register -> promote and deploy when the gate passed",
    )
    def lmforge_pipeline(
        config: str = "{}",
        inputs: str = "",
        inputs_digest: str = "",
        base_model: str = "",
        max_steps: int = 0,
        lora_rank: int = 0,
        quantize_method: str = "",
        eval_suite: str = "",
        gate: str = "",
        registry_name: str = "",
    ):
        """config: the run's YAML as JSON (`lmforge pipeline submit` fills it in); inputs: paths or
        s3:// URIs, comma-separated or a JSON list; inputs_digest: content hash of the inputs (cache
        key); base_model: a model directory or models:/NAME@ALIAS (skips pretraining); max_steps:
        pretraining steps; lora_rank: fine-tune with this LoRA rank; quantize_method: int8|int4|none;
        eval_suite / gate: YAML paths; registry_name: the registered model. Empty/0: the config's."""
        cfg = settings(
            c.resolve_config(
                config=config,
                inputs=inputs,
                base_model=base_model,
                max_steps=max_steps,
                lora_rank=lora_rank,
                quantize_method=quantize_method,
                eval_suite=eval_suite,
                gate=gate,
                registry_name=registry_name,
            ),
            "resolve-config",
        )
        data = settings(c.curate(config=cfg.outputs["curate"], inputs_digest=inputs_digest), "curate")
        with dsl.If(base_model == "", name="pretrain-from-scratch"):
            tok = settings(
                c.train_tokenizer(config=cfg.outputs["tokenizer"], data=data.outputs["data"]), "tokenizer"
            )
            shards = settings(
                c.tokenize(data=data.outputs["data"], tokenizer=tok.outputs["tokenizer"]), "tokenize"
            )
            trained = settings(
                c.pretrain(config=cfg.outputs["pretrain"], shards=shards.outputs["shards"]), "pretrain"
            )
            after_model(cfg, data, trained.outputs["model"])
        with dsl.Else(name="from-base-model"):
            base = settings(c.import_base_model(base_model=base_model), "import-base-model")
            after_model(cfg, data, base.outputs["model"])

    return lmforge_pipeline


PIPELINE_ROOT_SCHEMES = ("s3://", "minio://", "gs://")


def check_pipeline_root(uri: str) -> str:
    """A KFP pipeline root for a cluster run: an object-store URI the backend's launcher writes
    artifacts to (s3://BUCKET/PREFIX on MinIO or S3, minio://BUCKET/PREFIX for the MinIO KFP ships
    with, gs://...). kfp.local takes only a local folder, so `lmforge run` keeps <workdir>/kfp."""
    from lmforge.errors import UserError

    uri = uri.strip().rstrip("/")
    rest = uri.partition("://")[2]
    if not uri.startswith(PIPELINE_ROOT_SCHEMES) or not rest.split("/", 1)[0]:
        expected = ", ".join(f"{s}BUCKET/PREFIX" for s in PIPELINE_ROOT_SCHEMES)
        raise UserError(
            f"pipeline root {uri!r}: expected {expected} "
            "(a local folder works only for kfp.local, which `lmforge run` uses)"
        )
    return uri


def compile_pipeline(output: str | Path, image: str = DEFAULT_IMAGE, **options: Any) -> Path:
    """Write the pipeline's IR YAML (for the Kubeflow UI, `kfp run create --package-file`)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, **options), str(out))
    return out
