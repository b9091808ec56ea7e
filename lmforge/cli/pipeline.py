"""`lmforge pipeline compile|upload|submit`: the Kubeflow pipeline of every stage, for a cluster.

    lmforge pipeline compile --output pipeline.yaml --image registry.example.com/lmforge:0.1.0 \
        --pipeline-root s3://lmforge-kfp/pipeline-root
    lmforge pipeline upload --host https://kfp.example.com --image ...
    lmforge pipeline submit --host https://kfp.example.com --experiment lmforge --config configs/demo.yaml

(`lmforge run` runs the same pipeline on this machine through kfp.local.)
"""

from __future__ import annotations

import argparse
import os

from lmforge.cli._args import add_config_args

IMAGE_ENV = "LMFORGE_IMAGE"
ROOT_ENV = "LMFORGE_PIPELINE_ROOT"


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.pipelines import DEFAULT_IMAGE

    parser = sub.add_parser(
        "pipeline",
        help="compile the Kubeflow pipeline, upload it, or start a run on a Kubeflow Pipelines backend",
        description="The Kubeflow Pipelines (v2) pipeline of every stage: curate -> tokenizer -> tokenize -> "
        "pretrain (or a base model) -> finetune -> quantize -> evaluate -> register -> promote and deploy "
        "when the gate passed. Every component runs in the project image.",
    )
    verbs = parser.add_subparsers(dest="pipeline_command", metavar="VERB", required=True)
    default_image = os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--image",
            default=default_image,
            help=f"the project image every component runs in (default ${IMAGE_ENV} or {DEFAULT_IMAGE})",
        )
        p.add_argument(
            "--gpus", type=int, default=1, help="accelerators per training task (pretrain, finetune); 0: none"
        )
        p.add_argument("--accelerator", default="nvidia.com/gpu", help="accelerator resource type")
        p.add_argument("--retries", type=int, default=2, help="retries of a failed data or training task")
        p.add_argument(
            "--env-configmap",
            default="",
            metavar="NAME",
            help="ConfigMap whose keys (MLFLOW_TRACKING_URI, LMFORGE_S3_ENDPOINT, RAY_ADDRESS...) every task "
            "gets as environment: the Helm chart's <release>-env",
        )
        p.add_argument(
            "--s3-secret",
            default="",
            metavar="NAME",
            help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for every task: the chart's "
            "s3.existingSecret (e.g. lmforge-s3)",
        )
        p.add_argument(
            "--pipeline-root",
            default=os.environ.get(ROOT_ENV, ""),
            metavar="URI",
            help="where the backend stores every task's artifacts: s3://BUCKET/PREFIX (MinIO/S3), "
            f"minio://BUCKET/PREFIX or gs://... (default ${ROOT_ENV}; submit: else the config's "
            "pipeline_root, else the backend's default)",
        )

    compile_p = verbs.add_parser("compile", help="write the pipeline's IR YAML")
    compile_p.add_argument(
        "--output", "-o", default="pipeline.yaml", help="where to write it (default pipeline.yaml)"
    )
    common(compile_p)
    compile_p.set_defaults(func=_compile)

    upload_p = verbs.add_parser(
        "upload", help="register the pipeline (or a new version) in Kubeflow Pipelines"
    )
    upload_p.add_argument("--host", required=True, help="the Kubeflow Pipelines URL, http(s)://HOST[:PORT]")
    upload_p.add_argument("--name", default="lmforge", help="pipeline name in the UI (default lmforge)")
    upload_p.add_argument(
        "--version", help="version name when the pipeline exists (default: code version + time)"
    )
    common(upload_p)
    upload_p.set_defaults(func=_upload)

    submit_p = verbs.add_parser("submit", help="start a pipeline run on Kubeflow Pipelines")
    submit_p.add_argument("--host", required=True, help="the Kubeflow Pipelines URL, http(s)://HOST[:PORT]")
    submit_p.add_argument("--experiment", default="lmforge", help="KFP experiment (default lmforge)")
    submit_p.add_argument("--run-name", help="run name (default: register.model_name)")
    submit_p.add_argument("--no-cache", action="store_true", help="run every task, reusing no cached result")
    add_config_args(
        submit_p,
        example="pretrain.schedule.max_steps=50",
        config_help="the run's YAML (as `lmforge run`'s; paths are read inside the cluster)",
    )
    common(submit_p)
    submit_p.set_defaults(func=_submit)


def _options(args: argparse.Namespace) -> dict:
    from lmforge.errors import UserError

    if args.gpus < 0 or args.retries < 0:
        raise UserError("--gpus and --retries must be >= 0")
    if not args.image.strip():
        raise UserError("--image must name the project image")
    return {
        "gpus": args.gpus,
        "accelerator": args.accelerator,
        "retries": args.retries,
        "env_config_map": args.env_configmap,
        "s3_secret": args.s3_secret,
        "pipeline_root": args.pipeline_root,
    }


def _compile(args: argparse.Namespace) -> int:
    from lmforge.pipelines.pipeline import compile_pipeline

    out = compile_pipeline(args.output, args.image, **_options(args))
    root = f", pipeline root {args.pipeline_root}" if args.pipeline_root else ""
    print(f"wrote {out} (image {args.image}{root})")
    print(f"run it: kfp run create --experiment-name lmforge --package-file {out}  (or upload it in the UI)")
    return 0


def _upload(args: argparse.Namespace) -> int:
    from lmforge.pipelines.remote import upload

    done = upload(args.host, image=args.image, name=args.name, version=args.version, **_options(args))
    what = f"version {done.version_id} of" if done.version_id else "new pipeline"
    print(f"uploaded {what} {done.name!r} (pipeline id {done.pipeline_id}) to {args.host}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig
    from lmforge.pipelines.remote import submit

    cfg = load(LifecycleConfig, args.config, args.overrides)
    done = submit(
        cfg,
        args.host,
        image=args.image,
        experiment=args.experiment,
        run_name=args.run_name,
        caching=not args.no_cache,
        **_options(args),
    )
    print(f"started run {done.run_id}: {done.url}")
    return 0
