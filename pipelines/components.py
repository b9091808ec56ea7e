"""The KFP components: one per stage, each a thin typed wrapper over its function in `steps.py`.

A component only unpacks its artifacts (`.path`, `.metadata`), makes one call, and puts the
result on its outputs: typed artifacts (Dataset, Model, Metrics, Markdown) so the Kubeflow UI shows
the datacard, the fertility and evaluation reports and the metrics on each task. Imports sit inside
the bodies (KFP ships a component as its function's source). Lineage facts (data and tokenizer
hashes, base model, ...) travel in the artifacts' metadata under "lineage".

`build(image)` makes them for one image: every component runs in the project image, with no pip
step at run time (`packages_to_install=[]`, `install_kfp_package=False`: the image holds kfp and
lmforge).
"""

from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from lmforge.pipelines import DEFAULT_IMAGE


def resolve_config(
    config: str,
    inputs: str,
    base_model: str,
    max_steps: int,
    lora_rank: int,
    quantize_method: str,
    eval_suite: str,
    gate: str,
    registry_name: str,
) -> NamedTuple(
    "Resolved",
    [
        ("curate", str),
        ("tokenizer", str),
        ("pretrain", str),
        ("finetune", str),
        ("quantize", str),
        ("evaluate", str),
        ("register", str),
    ],
):
    """Validate the whole config with the pipeline parameters applied, before any stage runs."""
    from collections import namedtuple

    from lmforge.pipelines import steps

    r = steps.resolve(
        config, inputs, base_model, max_steps, lora_rank, quantize_method, eval_suite, gate, registry_name
    )
    names = ["curate", "tokenizer", "pretrain", "finetune", "quantize", "evaluate", "register"]
    return namedtuple("Resolved", names)(*[r[n] for n in names])


def curate(
    config: str,
    inputs_digest: str,  # content hash of the input files (cache key only; "" = unknown)
    data: Output[Dataset],
    datacard: Output[Markdown],
    metrics: Output[Metrics],
):
    """Clean, filter, deduplicate and split the raw documents (`lmforge curate`)."""
    from lmforge.pipelines import steps

    values, lineage = steps.curate(config, data.path, datacard.path)
    data.metadata["lineage"] = lineage
    steps.log_metrics(metrics, values)


def train_tokenizer(
    config: str,
    data: Input[Dataset],
    tokenizer: Output[Artifact],
    report: Output[Markdown],
    metrics: Output[Metrics],
):
    """Train the byte-level BPE tokenizer on the curated train split (`lmforge tokenizer train`)."""
    from lmforge.pipelines import steps

    values, lineage = steps.train_tokenizer(
        config, data.path, tokenizer.path, report.path, data.metadata.get("lineage", {})
    )
    tokenizer.metadata["lineage"] = lineage
    steps.log_metrics(metrics, values)


def tokenize(
    data: Input[Dataset], tokenizer: Input[Artifact], shards: Output[Dataset], metrics: Output[Metrics]
):
    """Encode every split into memory-mapped token shards (`lmforge tokenize`)."""
    from lmforge.pipelines import steps

    values, lineage = steps.tokenize(
        data.path, tokenizer.path, shards.path, tokenizer.metadata.get("lineage", {})
    )
    shards.metadata["lineage"] = lineage
    steps.log_metrics(metrics, values)


def pretrain(
    config: str,
    shards: Input[Dataset],
    model: Output[Model],
    loss_curve: Output[HTML],
    metrics: Output[Metrics],
):
    """Pretrain on Ray Train (`lmforge pretrain`): in-process Ray, or the KubeRay cluster at $RAY_ADDRESS."""
    import base64
    import os

    from lmforge.pipelines import steps

    png = model.path + ".loss.png"
    values, lineage = steps.pretrain(config, shards.path, model.path, png, shards.metadata.get("lineage", {}))
    model.metadata["lineage"] = lineage
    picture = ""
    if os.path.isfile(png):
        with open(png, "rb") as fh:
            picture = f'<img alt="loss" src="data:image/png;base64,{base64.b64encode(fh.read()).decode()}">'
    with open(loss_curve.path, "w", encoding="utf-8") as fh:
        fh.write(f"<html><body><h1>Pretraining loss</h1>{picture or '<p>no loss curve</p>'}</body></html>")
    steps.log_metrics(metrics, values)


def import_base_model(base_model: str, model: Output[Model]):
    """The base model given instead of pretraining (a model directory or models:/NAME@ALIAS)."""
    from lmforge.pipelines import steps

    _, lineage = steps.import_model(base_model, model.path, {})
    model.metadata["lineage"] = lineage


def finetune(config: str, model: Input[Model], tuned: Output[Model], metrics: Output[Metrics]):
    """LoRA fine-tuning (`lmforge finetune`); `tuned` is the merged model (the input as it is when
    finetune.enabled is false)."""
    from lmforge.pipelines import steps

    values, lineage = steps.finetune(config, model.path, tuned.path, model.metadata.get("lineage", {}))
    tuned.metadata["lineage"] = lineage
    steps.log_metrics(metrics, values)


def quantize(
    config: str, model: Input[Model], data: Input[Dataset], quantized: Output[Model], metrics: Output[Metrics]
):
    """Quantize the model's weights (`lmforge quantize`), calibrated on the curated train split; the
    input as it is when quantize.method is empty."""
    from lmforge.pipelines import steps

    values, lineage = steps.quantize(
        config, model.path, quantized.path, model.metadata.get("lineage", {}), data_dir=data.path
    )
    quantized.metadata["lineage"] = lineage
    steps.log_metrics(metrics, values)


def evaluate(
    config: str,
    model: Input[Model],
    data: Input[Dataset],
    results: Output[Artifact],
    report: Output[Markdown],
    metrics: Output[Metrics],
) -> bool:
    """Run the evaluation suite and the gate (`lmforge evaluate`); returns whether the gate passed."""
    from lmforge.pipelines import steps

    values, lineage, passed = steps.evaluate(
        config, model.path, data.path, results.path, report.path, model.metadata.get("lineage", {})
    )
    results.metadata["lineage"] = lineage
    results.metadata["gate_passed"] = passed
    steps.log_metrics(metrics, values)
    return passed


def register(config: str, model: Input[Model], evaluation: Input[Artifact], metrics: Input[Metrics]) -> str:
    """Register the model as the next version (alias register.alias), lineage as version tags."""
    from lmforge.pipelines import steps

    lineage = {**model.metadata.get("lineage", {}), **evaluation.metadata.get("lineage", {})}
    version, _ = steps.register(config, model.path, lineage, dict(metrics.metadata))
    return version


def promote(config: str, version: str) -> str:
    """Move gate.promote_alias (champion) to the version; returns models:/NAME@ALIAS."""
    from lmforge.pipelines import steps

    return steps.promote(config, version)


def deploy(model_uri: str, version: str, note: Output[Markdown]):
    """Serving follows the promoted alias: check it resolves to the version, say how it is served."""
    from lmforge.pipelines import steps

    steps.deploy(model_uri, version, note.path)


STAGES = (
    resolve_config,
    curate,
    train_tokenizer,
    tokenize,
    pretrain,
    import_base_model,
    finetune,
    quantize,
    evaluate,
    register,
    promote,
    deploy,
)


def build(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Every component for `image`, by name (`build(img).curate`, ...)."""
    return SimpleNamespace(
        **{
            fn.__name__: dsl.component(
                fn, base_image=image, packages_to_install=[], install_kfp_package=False
            )
            for fn in STAGES
        }
    )
