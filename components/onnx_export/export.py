"""The ONNX export stage: `export_onnx(model_dir, output_dir) -> OnnxExportResult`.

    load the model (fp32) -> wrap it (wrapper.py: KV cache as inputs/outputs) -> torch.onnx.export
    (the torch.export-based exporter, dynamic batch / sequence / past axes, opset 18) -> copy config,
    generation config, tokenizer -> parity: onnxruntime vs PyTorch logits on a prefill and decode
    steps of random ids (refuses to finish when they differ beyond `atol`) -> onnx_export.json

Output directory:
    model.onnx            the graph (weights inside, or in model.onnx.data above 1.5 GB: protobuf's 2 GB cap)
    config.json, generation_config.json, tokenizer files    as in the model directory
    onnx_export.json      format, opset, input/output names and shapes, source, parity figures

Opset: torch 2.13's exporter implements opset 18 and up (asked for 17, it converts down and fails on
this graph), so 18 is the default; RMSNorm is decomposed into primitive ops (the fused
RMSNormalization op needs opset 23, which TensorRT 10 and older runtimes lack).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.components.onnx_export.runtime import OnnxDecoderSession
from lmforge.components.onnx_export.wrapper import OnnxDecoder, input_names, output_names
from lmforge.errors import ConfigError, UserError
from lmforge.model.checkpoint import TOKENIZER_FILES, load_model_dir, read_config
from lmforge.model.transformer import Transformer

FORMAT = "lmforge-onnx/1"
MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclass
class OnnxExportResult:
    output_dir: Path
    onnx_path: Path
    metadata: dict[str, Any]  # what onnx_export.json holds


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    opset: int = MIN_OPSET,
    check: bool = True,
    atol: float = 1e-4,
    verbose: bool = True,
) -> OnnxExportResult:
    src, out = Path(model_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(
            f"opset must be an integer >= {MIN_OPSET} (torch's exporter starts there), got {opset!r}"
        )
    if src == out:
        raise UserError(f"--output {output_dir} is the model directory; choose another directory")
    read_config(src)  # a clear error for a missing / invalid model directory
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {output_dir} exists and is not empty; choose a new directory")

    def say(msg: str) -> None:
        if verbose:
            print(f"[export-onnx] {msg}", flush=True)

    model = load_model_dir(src, dtype=torch.float32).eval()
    cfg = model.config
    decoder = OnnxDecoder(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    external = cfg.num_params() * 4 > EXTERNAL_DATA_BYTES
    say(f"exporting {src} ({cfg.num_params() / 1e6:.1f}M params, {cfg.n_layers} layers) to {onnx_path}")
    start = time.perf_counter()
    _export(decoder, onnx_path, opset, external)
    seconds = time.perf_counter() - start

    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    n = cfg.n_layers
    meta: dict[str, Any] = {
        "format": FORMAT,
        "source": str(src),
        "opset": opset,
        "external_data": external,
        "export_seconds": round(seconds, 2),
        "inputs": {
            "input_ids": ["batch", "seq"],
            **{name: ["batch", cfg.n_kv_heads, "past", cfg.head_dim] for name in input_names(n)[1:]},
        },
        "outputs": {
            "logits": ["batch", "seq", cfg.vocab_size],
            **{name: ["batch", cfg.n_kv_heads, "past + seq", cfg.head_dim] for name in output_names(n)[1:]},
        },
        "usage": "prefill: past_key_values.* of length 0 and the prompt; decode: the previous present.* "
        "as past_key_values.* and one token per row; positions are past .. past + seq - 1",
    }
    if check:
        meta["parity"] = check_parity(model, onnx_path, atol=atol)
        say(
            f"onnxruntime matches PyTorch: max |logit diff| {meta['parity']['max_abs_diff']:.2e} "
            f"(atol {atol})"
        )
    (out / "onnx_export.json").write_text(json.dumps(meta, indent=2) + "\n")
    say(f"written {out}")
    return OnnxExportResult(output_dir=out, onnx_path=onnx_path, metadata=meta)


def _export(decoder: OnnxDecoder, path: Path, opset: int, external: bool) -> None:
    from torch.export import Dim

    cfg = decoder.model.config
    n = cfg.n_layers
    # example shapes only fix the trace: batch, sequence and past length are all dynamic
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = [torch.zeros(2, decoder.n_kv_heads, 2, decoder.head_dim) for _ in range(2 * n)]
    batch, seq = Dim("batch", max=4096), Dim("seq", max=cfg.max_seq_len)
    past_len = Dim("past", max=cfg.max_seq_len)
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in range(2 * n)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on unused axis names, torchvision, ...
        program = torch.onnx.export(
            decoder,
            (ids, *past),
            dynamo=True,
            opset_version=opset,
            input_names=input_names(n),
            output_names=output_names(n),
            dynamic_shapes=shapes,
            verbose=False,
        )
        assert program is not None
        program.save(str(path), external_data=external)


@torch.inference_mode()
def check_parity(model: Transformer, onnx_path: Path, atol: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Logits of onnxruntime vs PyTorch: a prefill of 2 x 7 random ids with an empty past, then 3
    decode steps of one token each on the returned presents. Raises when they differ beyond atol."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    steps, prompt = 3, min(7, cfg.max_seq_len - 3)
    ids = torch.randint(0, cfg.vocab_size, (2, prompt + steps), generator=gen)
    reference = model(ids).float().numpy()  # (2, prompt + steps, V): full causal forward
    session = OnnxDecoderSession(onnx_path)
    logits, past = session(ids[:, :prompt].numpy(), session.empty_past(2))
    diffs = [float(np.abs(logits - reference[:, :prompt]).max())]
    for t in range(prompt, prompt + steps):
        logits, past = session(ids[:, t : t + 1].numpy(), past)
        diffs.append(float(np.abs(logits - reference[:, t : t + 1]).max()))
    worst = max(diffs)
    if not worst <= atol:
        raise RuntimeError(
            f"onnxruntime logits differ from PyTorch's by {worst:.3e} (> atol {atol}); per call: {diffs}"
        )
    return {
        "max_abs_diff": worst,
        "prefill_abs_diff": diffs[0],
        "decode_abs_diff": max(diffs[1:]),
        "atol": atol,
    }
