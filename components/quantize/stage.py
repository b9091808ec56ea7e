"""`quantize(model, output_dir, method=...)`: weight-only post-training quantization of a model directory.

    int8        per-channel symmetric round-to-nearest
    int4        group-wise asymmetric round-to-nearest (scales + zero points, two values per byte)
    int4-awq    activation-aware scaling on calibration data, then int4 (awq.py)
    int4-gptq   int4 with GPTQ error compensation on calibration data (gptq.py)

Every Linear layer of the decoder is quantized, and the output head too unless `keep_embeddings`
(the input embedding always stays in its stored precision: it is a table lookup, and transformers
cannot load a quantized embedding). A tied output head is untied: it is stored quantized, the
embedding stays as it was. The output is a model directory in the compressed-tensors layout
(layout.py) plus `report.json`: bytes before/after measured from the tensors, the ratio, and, when
calibration data is given, the mean next-token loss on it before and after.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.components.quantize.methods import CALIBRATED, Scheme, rtn
from lmforge.errors import ConfigError, InputNotFoundError, UserError
from lmforge.model.quantized import LINEAR_NAMES, quantization_scheme, tensor_bytes


class AlreadyQuantizedError(UserError):
    """The input model directory is already quantized."""


@dataclass
class QuantizeResult:
    output_dir: Path
    method: str
    report: dict[str, Any]


def resolve_model_dir(model: str | Path) -> Path:
    """A local model directory, downloading a models:/NAME@ALIAS or models:/NAME/VERSION URI."""
    from lmforge.registry import RegistryClient, is_registry_uri

    spec = str(model)
    if is_registry_uri(spec):
        client = RegistryClient()
        return Path(client.download(client.resolve(spec)))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise InputNotFoundError(f"--model {spec} is not a model directory (config.json missing)")
    return path


def quantized_layer_names(model: nn.Module, keep_embeddings: bool) -> list[str]:
    def path(name: str) -> str:
        return ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + name

    names = [f"model.layers.{i}.{path(n)}" for i in range(model.config.n_layers) for n in LINEAR_NAMES]
    return names if keep_embeddings else [*names, "lm_head"]


def check_group_size(model: nn.Module, names: list[str], scheme: Scheme) -> None:
    if scheme.group_size is None:
        return
    for name in names:
        cols = model.get_submodule(name).in_features
        if cols % scheme.group_size:
            raise ConfigError(
                f"quantize.group_size={scheme.group_size} does not divide the input dimension {cols} of "
                f"{name}; choose a group size that divides it (e.g. 32, 64 or 128)"
            )


@torch.no_grad()
def mean_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over sequences (n, T)."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        total += float(loss) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def quantize(
    model: str | Path,
    output_dir: str | Path,
    *,
    method: str,
    group_size: int = 64,
    calibration: str | Path | None = None,
    keep_embeddings: bool = False,
    num_sequences: int = 256,
    seq_len: int = 128,
    min_sequences: int = 64,
    gptq_act_order: bool = True,
    log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize `model` (a directory or models:/ URI) into `output_dir`; see the module docstring."""
    from lmforge.components.quantize.calibration import collect_input_stats, load_calibration
    from lmforge.components.quantize.layout import to_quantized_model
    from lmforge.model.checkpoint import load_model_dir, load_state_dict, save_model_dir

    say = log or (lambda _msg: None)
    started = time.perf_counter()
    scheme = Scheme.for_method(method, group_size)
    for name, value, low in (
        ("num_sequences", num_sequences, 1),
        ("seq_len", seq_len, 2),
        ("min_sequences", min_sequences, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"quantize.{name} must be an integer >= {low}, got {value!r}")
    src = resolve_model_dir(model)
    if quantization_scheme(src) is not None:
        raise AlreadyQuantizedError(
            f"--model {model} is already quantized (config.json has a quantization_config); "
            "quantize the original full-precision model instead"
        )
    out = Path(output_dir)
    if out.resolve() == src.resolve():
        raise UserError("--output must differ from --model (the input would be overwritten)")

    bytes_before = sum(t.numel() * t.element_size() for t in load_state_dict(src).values())
    net = load_model_dir(src)
    names = quantized_layer_names(net, keep_embeddings)
    check_group_size(net, names, scheme)
    linear_bytes_before = sum(
        net.get_submodule(n).weight.numel() * net.get_submodule(n).weight.element_size() for n in names
    )
    head_tied = "lm_head" in names and net.config.tie_embeddings
    if head_tied:  # untie: the head is stored quantized (the engine can look embeddings up in it)
        net.config = dataclasses.replace(net.config, tie_embeddings=False)
        net.lm_head.weight = nn.Parameter(net.model.embed_tokens.weight.detach().clone(), requires_grad=False)

    ids = None
    if method in CALIBRATED or calibration is not None:
        ids = load_calibration(
            calibration,
            src,
            num_sequences=num_sequences,
            seq_len=seq_len + 1,
            min_sequences=min_sequences if method in CALIBRATED else 1,
            vocab_size=net.config.vocab_size,
        )
        say(f"calibration: {ids.shape[0]} sequences of {seq_len} tokens")
    eval_ids = ids[: min(32, ids.shape[0])] if ids is not None else None
    loss_before = mean_loss(net, eval_ids) if eval_ids is not None else None

    details: dict[str, Any] = {}
    if method == "int4-awq":
        from lmforge.components.quantize.awq import apply_awq

        assert ids is not None
        stats = collect_input_stats(net, ids, names)
        say("awq: searching per-layer scales")
        details["awq_alpha"] = apply_awq(net, stats, set(names), scheme)
    if method == "int4-gptq":
        from lmforge.components.quantize.gptq import gptq_quantize

        assert ids is not None
        stats = collect_input_stats(net, ids, names, max_rows=1, hessian=True)
        say(f"gptq: quantizing with error compensation (act_order={gptq_act_order})")
        params = {
            n: gptq_quantize(net.get_submodule(n).weight, stats[n].h, scheme, act_order=gptq_act_order)
            for n in names
        }
        details["gptq_act_order"] = bool(gptq_act_order)
        del stats
    else:
        params = {n: rtn(net.get_submodule(n).weight, scheme) for n in names}

    ignore = [] if "lm_head" in names else ["lm_head"]
    qmodel = to_quantized_model(net, params, scheme, ignore)
    loss_after = mean_loss(qmodel, eval_ids) if eval_ids is not None else None
    bytes_after = tensor_bytes(qmodel)
    linear_bytes_after = sum(tensor_bytes(qmodel.get_submodule(n)) for n in names)
    report: dict[str, Any] = {
        "method": method,
        "scheme": method,  # (what hf_interop names when it refuses to export a quantized model)
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "symmetric": scheme.symmetric,
        "source": str(model),
        "quantized_layers": len(names),
        "output_head_quantized": "lm_head" in names,
        "head_tied": head_tied,  # the head was quantized from the tied embedding (share_tied_embedding)
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_after / bytes_before,
        "linear_bytes_before": linear_bytes_before,
        "linear_bytes_after": linear_bytes_after,
        "linear_ratio": linear_bytes_after / linear_bytes_before,
        "measured": "bytes: numel * element size of every stored tensor (before: the input's safetensors "
        "tensors; after: the quantized model's state dict, what model.safetensors holds). "
        "loss: mean next-token cross-entropy (nats) on up to 32 calibration sequences (in-sample "
        "for calibrated methods), before and after",
        "calibration_sequences": int(ids.shape[0]) if ids is not None else 0,
        "calibration_loss_before": loss_before,
        "calibration_loss_after": loss_after,
        "seconds": round(time.perf_counter() - started, 2),
        **details,
    }
    tokenizer = src if (src / "tokenizer.json").is_file() else None
    save_model_dir(qmodel, out, tokenizer_dir=tokenizer, extra_metadata={"quantization": report})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}: {bytes_before:,} -> {bytes_after:,} bytes ({report['ratio']:.3f}x)")
    return QuantizeResult(out, method, report)
