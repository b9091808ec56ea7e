"""What fine-tuning trains: `FinetuneTask`, the TrainTask (components/pretrain/task.py) of `lmforge finetune`.

    build_model   the base model directory, loaded in fp32 (or its quantized layers, for QLoRA);
                  lora / qlora: wrapped by peft's `get_peft_model` (adapters on the target modules,
                  every base parameter frozen, so only adapter parameters reach the optimizer);
                  full: every parameter trained
    train_data    the training JSONL as rows (data.py), this rank's share
    val_data      the validation JSONL, or None
    loss          mean next-token loss over the scored (response) targets, on the batch's real
                  tokens only (padding dropped, examples flattened, attention per example:
                  `varlen_loss`); packed and padded rows give the same loss as with their masks

The loop gets the lmforge `Transformer` with peft's LoRA layers injected in place
(`peft_model.base_model.model`), not the PeftModel wrapper: peft injects into the module it is
given, so the two share every parameter, and the loop, the strategies and the checkpoints keep
seeing a Transformer (its config, `model.layers`, its state-dict names plus peft's `lora_A/B`).
`build_peft_model` gives the wrapper back when the stage saves the adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.components.pretrain.task import TrainTask

IGNORE_INDEX = -100  # a target that is not scored

if TYPE_CHECKING:
    from lmforge.components.finetune.config import FinetuneConfig
    from lmforge.components.finetune.data import SFTDataset
    from lmforge.components.pretrain.config import PretrainConfig
    from lmforge.components.pretrain.env import RunEnv
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer


def lora_config(cfg: FinetuneConfig, base_reference: str) -> Any:
    """peft's LoraConfig for the `lora.*` section; `base_reference` is recorded in adapter_config.json."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
        bias="none",
        base_model_name_or_path=base_reference,
    )


def matching_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """The Linear modules `lora.target_modules` selects, by peft's rule: a list matches name suffixes,
    a string is a regular expression over the full module path."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            found.append(name)
    return found


def build_peft_model(base: Transformer, cfg: FinetuneConfig, base_reference: str) -> Any:
    """`base` with LoRA adapters injected (in place) and every base parameter frozen: a PeftModel.

    QLoRA: the targets are `lmforge.model.quantized.QuantizedLinear` (frozen int8 / int4 weights
    held as buffers, forward = dequantize + matmul). peft wraps them with its own LoRA `Linear`
    through a custom module mapping (`LoraConfig._register_custom_module`); that layer calls the
    base layer and adds B(A(x)) * scale. peft looks up a base layer's `weight` / `qweight` (only
    for its device) while injecting, which QuantizedLinear does not have: the packed tensor stands
    in as `qweight` during injection and is removed afterwards."""
    import warnings

    from peft import get_peft_model

    config = lora_config(cfg, base_reference)
    quantized: list[nn.Module] = []
    if cfg.method == "qlora":
        from peft.tuners.lora.layer import Linear as LoraLinear

        from lmforge.model.quantized import QuantizedLinear

        config._register_custom_module({QuantizedLinear: LoraLinear})
        quantized = [m for m in base.modules() if isinstance(m, QuantizedLinear)]
        for module in quantized:
            object.__setattr__(module, "qweight", module.weight_packed)
    try:
        with warnings.catch_warnings():  # "base_model_name_or_path was renamed to None": set again below
            warnings.simplefilter("ignore", UserWarning)
            model = get_peft_model(base, config)
    finally:
        for module in quantized:
            module.__dict__.pop("qweight", None)
    model.peft_config["default"].base_model_name_or_path = base_reference
    for module in quantized:
        if module is base.lm_head:  # the head's fused loss keeps no weight for backward
            lean_quantized_head(module)
        else:
            recompute_dequantized_weight(module)
    return model


def _per_channel_symmetric(module: nn.Module) -> bool:
    return module.group_size is None and module.symmetric


class _DequantizedLinear(torch.autograd.Function):
    """y = x @ dequantize(W).T for a frozen quantized W, keeping only the integer weight for backward:
    autograd would save the fp32 weight F.linear used (the size of the unquantized model, the
    memory QLoRA is there to avoid); the backward dequantizes it again instead.

    Per-channel symmetric (int8): the scale factors out of the dot products, y = (x q^T) * scale and
    dx = (dy * scale) q, so only an int -> float conversion precedes each matmul (the layer's own
    inference path; no scaled weight is materialised)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        if _per_channel_symmetric(module):
            scale = module.weight_scale[:, 0].to(x.dtype)  # (out,)
            return torch.nn.functional.linear(x, module.int_weight().to(x.dtype)) * scale
        return torch.nn.functional.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        module = ctx.module
        if _per_channel_symmetric(module):
            scale = module.weight_scale[:, 0].to(grad.dtype)
            return (grad * scale) @ module.int_weight().to(grad.dtype), None
        return grad @ module.dequantize(grad.dtype), None


def recompute_dequantized_weight(module: nn.Module) -> None:
    """Make a QuantizedLinear (no targets: a body layer) dequantize its weight again in backward."""
    import types

    def forward(self: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None, **kwargs: Any):
        assert targets is None, "a body layer is never called with targets"
        return _DequantizedLinear.apply(x, self)

    module.forward = types.MethodType(forward, module)


def lean_quantized_head(module: nn.Module) -> None:
    """Make a quantized output head (frozen) dequantize its weight in place for the fused loss: one
    fp32 vocabulary-sized matrix alive at the end of the forward pass instead of two (the converted
    integers and the scaled copy `dequantize` returns); same values, (q - zero_point) * scale. With
    the head frozen the fused loss computes no weight gradient either. Logits (no targets): as before."""
    import types

    from lmforge.model.fused_loss import fused_linear_cross_entropy

    plain = type(module).forward

    def forward(
        self: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100
    ) -> torch.Tensor:
        if targets is None:
            return plain(self, x)
        groups = self.weight_scale.shape[1]
        w = self.int_weight().to(x.dtype).view(self.out_features, groups, -1)  # (out, G, in/G)
        zp = self.zero_point()
        if zp is not None:
            w.sub_(zp.to(x.dtype).unsqueeze(-1))
        w.mul_(self.weight_scale.to(x.dtype).unsqueeze(-1))
        return fused_linear_cross_entropy(
            x, w.view(self.out_features, self.in_features), targets, ignore_index=ignore_index
        )

    module.forward = types.MethodType(forward, module)


def load_base(base_dir: str, method: str) -> Transformer:
    """The base model on CPU: fp32 for lora / full; as stored (its quantized layers) for qlora.

    QLoRA: when the quantized head was made from the tied input embedding (`lmforge quantize`
    records it), the embedding rows are read from the int8 / int4 head (`share_tied_embedding`)
    and the fp32 embedding is not kept: the whole frozen base is then quantized (113 MB less on
    SmolLM2-135M). The embedding is frozen, so nothing of it is trained or saved either way."""
    from lmforge.model.checkpoint import load_model_dir
    from lmforge.model.quantized import share_tied_embedding

    if method == "qlora":
        return share_tied_embedding(load_model_dir(base_dir, device="cpu"))
    return load_model_dir(base_dir, device="cpu", dtype=torch.float32)


@dataclass
class FinetuneTask(TrainTask):
    """Fine-tuning as the training loop sees it (picklable: travels to the Ray Train workers)."""

    cfg: FinetuneConfig  # the fine-tuning config (absolute paths)
    base_dir: str  # the base model directory (resolved from a models:/ URI if need be)
    base_reference: str  # what adapter_config.json records as the base (the URI or directory)
    tokenizer_dir: str
    eos_id: int | None

    name = "finetune"

    def build_model(self, cfg: PretrainConfig, model_cfg: ModelConfig) -> nn.Module:
        base = load_base(self.base_dir, self.cfg.method).train()
        if self.cfg.method == "full":
            return apply_scored_positions_only(base)
        peft_model = build_peft_model(base, self.cfg, self.base_reference)
        # the Transformer, adapters injected (see the module docstring)
        return apply_scored_positions_only(peft_model.base_model.model)

    def _dataset(self, path: str, env: RunEnv, what: str, shuffle: bool) -> SFTDataset:
        from lmforge.components.finetune.data import SFTDataset, load_encoder, load_examples, make_rows

        c = self.cfg
        enc = load_encoder(self.tokenizer_dir, self.eos_id, need_chat=c.data.format == "chat")
        examples, _ = load_examples(path, data_format(c), enc, c.max_seq_len, c.overlong, what)
        rows = make_rows(examples, c.max_seq_len, c.packing, enc.pad_id)
        return SFTDataset(rows, seed=c.seed, rank=env.rank, world_size=env.world_size, shuffle=shuffle)

    def train_data(self, cfg: PretrainConfig, env: RunEnv) -> SFTDataset:
        if self.cfg.method != "full":
            # imported here, before the loop notes the memory in use before the model is built, so
            # train/peak_train_mem_gb counts training, not the ~0.1 GB of peft + transformers code
            import peft.tuners.lora  # noqa: F401
        return self._dataset(self.cfg.data.train, env, "data.train", self.cfg.data.shuffle)

    def val_data(self, cfg: PretrainConfig, env: RunEnv) -> SFTDataset | None:
        if not self.cfg.data.validation:
            return None
        return self._dataset(self.cfg.data.validation, env, "data.validation", shuffle=False)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return varlen_loss(model, batch)


def varlen_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean loss over the scored targets of a batch of rows, padded or packed, computed on its
    real tokens only: they are flattened into one sequence, each example keeps its own positions,
    and attention runs per example (model/varlen.py). The same loss and gradients as running the
    (B, T) rows with padding and the causal (or packed "same example") mask, without the padding's
    compute and activations (38% of the positions of the bundled task's padded batches)."""
    from lmforge.model.varlen import VarlenLayout

    inputs, targets, positions, segments = batch  # (B, T) each
    keep = segments > 0
    layout = VarlenLayout.from_segments(segments, positions)
    return model(
        inputs[keep].unsqueeze(0),
        positions=positions[keep].unsqueeze(0),
        targets=targets[keep].unsqueeze(0),
        varlen=layout,
    )


def apply_scored_positions_only(model: Transformer) -> Transformer:
    """Run the output head (projection + cross-entropy) on the scored positions only.

    In fine-tuning most targets are IGNORE_INDEX (prompts, padding): a forward pre-hook on
    `lm_head` keeps the hidden states of the scored positions, (B, T, C) -> (1, n, C), before the
    vocabulary projection, so the head's cost follows the response tokens. The loss is the same
    (the mean over the scored targets); gradients reach the kept positions through the indexing.
    Costs one host sync per micro-batch on an accelerator (the count of scored tokens)."""

    def compact(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        targets = kwargs.get("targets")
        if targets is None:
            return None
        keep = targets != IGNORE_INDEX  # (B, T)
        return (args[0][keep].unsqueeze(0),), {**kwargs, "targets": targets[keep].unsqueeze(0)}

    model.lm_head.register_forward_pre_hook(compact, with_kwargs=True)
    return model


def data_format(cfg: FinetuneConfig):
    from lmforge.components.finetune.data import DataFormat

    d = cfg.data
    return DataFormat(d.format, d.prompt_field, d.response_field, d.messages_field, d.text_field)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
