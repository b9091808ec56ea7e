"""QLoRA's memory savers change no number: the quantized body layers that dequantize their weight
again in backward (the per-channel int8 fast path included) and the output head that dequantizes in
place for the fused loss give the same loss and gradients as the plain quantized model, for int8
and int4 bases; the fine-tuning model built by the stage has both applied."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _finetune_data import build_base

from lmforge.model.checkpoint import load_model_dir


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / "model", tokenizer_dir)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_layers_same_loss_and_gradients(tmp_path, base_dir, method) -> None:
    from lmforge.components.finetune.task import lean_quantized_head, recompute_dequantized_weight
    from lmforge.components.quantize.stage import quantize
    from lmforge.model.quantized import QuantizedLinear

    quantized = quantize(base_dir, tmp_path / "q", method=method, group_size=16).output_dir
    plain = load_model_dir(quantized)
    patched = copy.deepcopy(plain)
    assert isinstance(patched.lm_head, QuantizedLinear)
    for module in patched.modules():
        if isinstance(module, QuantizedLinear):
            if module is patched.lm_head:
                lean_quantized_head(module)
            else:
                recompute_dequantized_weight(module)
    ids = torch.randint(0, 400, (2, 10))
    targets = ids.clone()
    targets[0, :4] = -100  # a prompt
    losses, grads = [], []
    for model in (plain, patched):
        model.model.embed_tokens.weight.requires_grad_(True)  # gradients flow through every layer
        loss = model(ids, targets=targets)
        loss.backward()
        losses.append(loss)
        grads.append(model.model.embed_tokens.weight.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    # logits (no targets): unchanged
    with torch.no_grad():
        torch.testing.assert_close(patched(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_stage_model_has_the_savers_applied(tmp_path, base_dir) -> None:
    from lmforge.components.finetune.config import load_finetune_config
    from lmforge.components.finetune.task import build_peft_model, load_base
    from lmforge.components.quantize.stage import quantize
    from lmforge.model.quantized import QuantizedLinear

    quantized = quantize(base_dir, tmp_path / "q", method="int8").output_dir
    cfg = load_finetune_config(
        None, [f"base_model={quantized}", "data.train=t.jsonl", "method=qlora", "qlora.bits=8"]
    )
    inner = build_peft_model(load_base(str(quantized), "qlora"), cfg, str(quantized)).base_model.model
    layers = [m for m in inner.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all("forward" in vars(m) for m in layers)  # every quantized layer patched
    assert not inner.lm_head.weight_packed.requires_grad
    # the tied base's input embedding is read from the quantized head: no fp32 vocabulary matrix is kept
    from lmforge.model.quantized import QuantizedEmbedding

    assert inner.head_tied_to_embedding and isinstance(inner.model.embed_tokens, QuantizedEmbedding)
    fp32 = [n for n, p in inner.named_parameters() if p.dtype == torch.float32 and ".lora_" not in n]
    assert all("norm" in n for n in fp32), fp32  # only the norms' gains stay in fp32
