"""The pruning stage: `prune(config) -> PruneResult`, one code path for `lmforge prune` and the tests.

    load the model (fp32) -> held-out loss before (if data) -> prune (magnitude | structured)
    -> write <output> -> held-out loss after -> optional recovery fine-tune (pretraining loop,
    work dir <output>-recovery) -> <output> replaced by the recovered model -> held-out loss again

<output> is a model directory (Hugging Face Llama layout, tokenizer files copied from the input);
its `lmforge.json` and `prune_report.json` record the method, the sparsity asked for and reached,
the shapes before and after (structured) and the quality figures.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.components.prune.config import PruneConfig
from lmforge.components.prune.magnitude import magnitude_prune
from lmforge.components.prune.quality import heldout_loss
from lmforge.components.prune.structured import is_noop, structured_prune
from lmforge.components.token_dataset import PackedTokenDataset, read_index
from lmforge.errors import ConfigError, UserError
from lmforge.model.checkpoint import load_model_dir, read_config, save_model_dir
from lmforge.model.transformer import Transformer

REPORT_FILE = "prune_report.json"


@dataclass
class PruneResult:
    model_dir: Path
    report: dict[str, Any]  # method, sparsity asked/reached, shapes, quality before/after/recovered


def prune(cfg: PruneConfig, *, verbose: bool = True) -> PruneResult:
    src, out = Path(cfg.model).expanduser().resolve(), Path(cfg.output).expanduser().resolve()
    if src == out:
        raise UserError(f"--output {cfg.output} is the input model directory; choose another directory")
    model_cfg = read_config(src)  # a clear error for a missing / invalid model directory, before loading
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"--output {cfg.output} exists and is not a model directory; it would be replaced")
    if cfg.data:
        _check_data(cfg, model_cfg.vocab_size)
    if cfg.method == "structured":
        s = cfg.structured
        if is_noop(model_cfg, cfg.sparsity, s.mlp, s.heads, s.multiple_of):
            raise ConfigError(
                f"sparsity={cfg.sparsity} removes nothing from this model (d_ff={model_cfg.d_ff}, "
                f"n_kv_heads={model_cfg.n_kv_heads}, multiple_of={s.multiple_of}); raise the sparsity"
            )

    def say(msg: str) -> None:
        if verbose:
            print(f"[prune] {msg}", flush=True)

    model = load_model_dir(src, dtype=torch.float32)
    report: dict[str, Any] = {"method": cfg.method, "sparsity_requested": cfg.sparsity, "source": str(src)}
    quality: dict[str, dict[str, float]] = {}
    if cfg.data:
        quality["before"] = _quality(model, cfg)
        say(f"held-out loss before: {quality['before']['loss']:.4f}")

    if cfg.method == "magnitude":
        figures = magnitude_prune(model, cfg.sparsity, include_embeddings=cfg.include_embeddings)
        report["layers"] = {k.removeprefix("layer/"): v for k, v in figures.items() if k.startswith("layer/")}
        report.update({k: v for k, v in figures.items() if not k.startswith("layer/")})
        pruned: Transformer = model
    else:
        s = cfg.structured
        calibration = _calibration(cfg) if (cfg.data and s.calibration_batches) else None
        pruned, figures = structured_prune(
            model, cfg.sparsity, mlp=s.mlp, heads=s.heads, multiple_of=s.multiple_of, calibration=calibration
        )
        report.update(figures)
        report["scores"] = "activations" if calibration is not None else "weights"
    say(
        f"sparsity reached {report['sparsity']:.4f} of the prunable weights "
        f"({report['model_sparsity']:.4f} of all parameters)"
    )

    tokenizer = src if (src / "tokenizer.json").is_file() else None
    save_model_dir(pruned, out, tokenizer_dir=tokenizer, extra_metadata={"prune": report})
    if cfg.data:
        quality["pruned"] = _quality(pruned, cfg)
        say(f"held-out loss after pruning: {quality['pruned']['loss']:.4f}")

    if cfg.recovery.steps:
        recovered = _recover(cfg, out, say)
        if cfg.method == "magnitude":
            report["sparsity_after_recovery"] = _prunable_sparsity(recovered, cfg)
        save_model_dir(recovered, out, tokenizer_dir=tokenizer, extra_metadata={"prune": report})
        quality["recovered"] = _quality(recovered, cfg)
        say(f"held-out loss after {cfg.recovery.steps} recovery steps: {quality['recovered']['loss']:.4f}")

    if quality:
        report["quality"] = {"split": cfg.eval_split, **quality}
        base = quality["before"]["loss"]
        last = quality.get("recovered", quality["pruned"])["loss"]
        report["quality"]["loss_change"] = last - base
    meta_path = out / "lmforge.json"
    meta = json.loads(meta_path.read_text())
    meta["prune"] = report
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    say(f"model written to {out}")
    return PruneResult(model_dir=out, report=report)


def _check_data(cfg: PruneConfig, vocab_size: int) -> None:
    index = read_index(cfg.data)  # InputNotFoundError / UserError with the reason
    if int(index["vocab_size"]) > vocab_size:
        raise ConfigError(
            f"data: {cfg.data} uses a vocabulary of {index['vocab_size']} ids, the model has {vocab_size}"
        )
    for split in (
        {cfg.eval_split, "train"} if cfg.recovery.steps or cfg.method == "structured" else {cfg.eval_split}
    ):
        if split not in index["splits"]:
            raise ConfigError(
                f"data: {cfg.data} has no {split!r} split (found: {', '.join(sorted(index['splits']))})"
            )
    PackedTokenDataset(cfg.data, cfg.eval_split, cfg.eval_seq_len)  # enough tokens for one sequence


def _quality(model: torch.nn.Module, cfg: PruneConfig) -> dict[str, float]:
    assert cfg.data
    return heldout_loss(
        model, cfg.data, split=cfg.eval_split, seq_len=cfg.eval_seq_len, batches=cfg.eval_batches
    )


def _calibration(cfg: PruneConfig) -> list[torch.Tensor]:
    """The first batches of the train split (never the split the quality is measured on)."""
    assert cfg.data
    data = PackedTokenDataset(cfg.data, "train", cfg.eval_seq_len, shuffle=False)
    return [x for x, _ in data.iter_eval_batches(4, max_batches=cfg.structured.calibration_batches)]


def _prunable_sparsity(model: Transformer, cfg: PruneConfig) -> float:
    from lmforge.components.prune.magnitude import prunable_weights

    weights = list(prunable_weights(model, cfg.include_embeddings).values())
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _recover(cfg: PruneConfig, pruned_dir: Path, say) -> Transformer:
    from lmforge.components.pretrain.stage import pretrain
    from lmforge.components.prune.recovery import KeepZerosTask, recovery_config

    work = Path(cfg.recovery.work_dir or f"{pruned_dir}-recovery").expanduser().resolve()
    if work.exists():
        shutil.rmtree(work)  # a fresh short run each time (its checkpoints are not a deliverable)
    say(f"recovery fine-tune: {cfg.recovery.steps} steps on {cfg.data} (work dir {work})")
    task = KeepZerosTask() if cfg.method == "magnitude" else None
    result = pretrain(recovery_config(cfg, pruned_dir, work), task=task, verbose=False)
    if result.model_dir is None:
        raise UserError(f"the recovery run stopped before finishing (checkpoint {result.checkpoint_dir})")
    return load_model_dir(result.model_dir, dtype=torch.float32)


__all__ = ["PruneResult", "prune"]
