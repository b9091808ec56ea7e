"""`lmforge finetune` / `lmforge merge`: config and data checks, masking and packing by construction,
LoRA end to end in-process (adapter in PEFT layout that loads with peft onto the Hugging Face model
with the same logits, base bit-identical, merge == base + adapter, exact resume, MLflow run and
registered adapter version), and bad input refused before Ray starts. The Ray run is in
test_finetune_ray.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _finetune_data import build_base, instruction_records, make_config, write_jsonl
from safetensors.torch import load_file, save_file

from lmforge.components.finetune.config import load_finetune_config
from lmforge.components.finetune.data import (
    IGNORE_INDEX,
    DataError,
    DataFormat,
    SFTDataset,
    encode_example,
    example_pieces,
    load_encoder,
    load_examples,
    make_rows,
)
from lmforge.components.finetune.task import varlen_loss
from lmforge.model.checkpoint import load_model_dir, load_state_dict
from lmforge.model.config import ConfigError, ModelConfig
from lmforge.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_base(tmp_path_factory.mktemp("base") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_records())


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=0", "lora.r must be an integer >= 1"),
        ("lora.target_modules=[q_proj, qkv]", "unknown module(s) qkv; valid names: q_proj, k_proj"),
        ("qlora.bits=3", "qlora.bits must be 8 or 4"),
        ("method=prefix", "method='prefix' is not one of: lora, qlora, full"),
        ("data.format=csv", "data.format='csv' is not one of"),
        ("overlong=wrap", "overlong='wrap' is not one of"),
        ("strategy.name=fsdp", "fine-tuning supports ddp only"),
        ("data.global_batch_size=5", "not a multiple of data.micro_batch_size"),
    ],
)
def test_bad_config_names_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_finetune_config(None, ["base_model=x", "data.train=t.jsonl", override])
    assert message in str(err.value)


def test_base_model_required() -> None:
    with pytest.raises(ConfigError, match="base_model is required"):
        load_finetune_config(None, ["data.train=t.jsonl"])


@pytest.mark.parametrize("name", ["finetune-demo.yaml", "finetune-smollm2.yaml"])
def test_demo_config_validates(name: str) -> None:
    cfg = load_finetune_config(REPO / "configs" / name, [])
    assert cfg.method == "lora" and cfg.data.format == "instruction"
    assert cfg.to_train_config().data.seq_len == cfg.max_seq_len


# ---- data: masking by construction ----------------------------------------------------------
def test_instruction_scores_only_response_and_eos(tokenizer_dir: Path) -> None:
    enc = load_encoder(tokenizer_dir, eos_id=1, need_chat=False)
    record = {"prompt": "The quick brown fox", "response": " jumps over the lazy dog."}
    pieces = example_pieces(record, DataFormat(), enc, "x")
    inputs, targets = encode_example(pieces, enc, add_eos=True)
    prompt_ids = enc.encode(record["prompt"], True)
    response_ids = enc.encode(record["response"], False)
    assert inputs == prompt_ids + response_ids  # the eos is only ever a target
    scored = [t for t in targets if t != IGNORE_INDEX]
    assert scored == response_ids + [1]
    assert targets[: len(prompt_ids) - 1] == [IGNORE_INDEX] * (len(prompt_ids) - 1)
    assert enc.tokenizer.decode(scored[:-1]) == record["response"]


def test_chat_scores_assistant_turns_only(tokenizer_dir: Path) -> None:
    enc = load_encoder(tokenizer_dir, eos_id=1, need_chat=True)
    assert enc.chat_template is not None and not enc.chat_template_added  # lmforge tokenizers have one
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does the fox do?"},
        {"role": "assistant", "content": "It jumps."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "It sleeps."},
    ]
    pieces = example_pieces({"messages": messages}, DataFormat(format="chat"), enc, "x")
    assert "".join(p[0] for p in pieces) == enc.render(messages)  # the whole conversation, in order
    scored_text = [p[0] for p in pieces if p[1]]
    assert scored_text == ["It jumps.<|im_end|>\n", "It sleeps.<|im_end|>\n"]
    inputs, targets = encode_example(pieces, enc, add_eos=False)
    scored = [t for t in targets if t != IGNORE_INDEX]
    assert enc.tokenizer.decode(scored, skip_special_tokens=False) == "".join(scored_text)


def test_chat_template_added_for_a_tokenizer_without_one(tmp_path: Path, tokenizer_dir: Path) -> None:
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    enc = load_encoder(tok, eos_id=1, need_chat=True)
    assert enc.chat_template_added and "<|im_start|>" in enc.chat_template


@pytest.mark.parametrize(
    ("fmt", "record", "message"),
    [
        ("instruction", {"prompt": "a"}, "field 'response' is missing"),
        ("instruction", {"prompt": "a", "response": 3}, "field 'response' must be a string"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ("chat", {"messages": [{"role": "user"}]}, "needs string fields 'role' and 'content'"),
        ("text", {"body": "x"}, "field 'text' is missing"),
    ],
)
def test_bad_records(tmp_path: Path, tokenizer_dir: Path, fmt: str, record: dict, message: str) -> None:
    enc = load_encoder(tokenizer_dir, eos_id=1, need_chat=fmt == "chat")
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError, match="d.jsonl:1") as err:
        load_examples(path, DataFormat(format=fmt), enc, 64, "truncate")
    assert message in str(err.value)


def test_overlong_examples_truncated_or_dropped_and_counted(tmp_path: Path, tokenizer_dir: Path) -> None:
    enc = load_encoder(tokenizer_dir, eos_id=1, need_chat=False)
    records = [{"prompt": "fox", "response": " dog"}, {"prompt": "fox", "response": " dog" * 40}]
    records.append({"prompt": "fox " * 40, "response": " dog"})  # the response is cut off entirely
    path = write_jsonl(tmp_path / "d.jsonl", records)
    kept, stats = load_examples(path, DataFormat(), enc, 16, "truncate")
    assert (stats.kept, stats.truncated, stats.dropped_no_target, stats.dropped_overlong) == (2, 2, 1, 0)
    assert all(len(x) <= 16 for x, _ in kept)
    kept, stats = load_examples(path, DataFormat(), enc, 16, "drop")
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (1, 0, 2)


# ---- packing: no attention across examples --------------------------------------------------
def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """The dense reference: (B, 1, T, T) bool, True = may attend: causal, and within the same example."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)


def test_packed_loss_equals_separate_losses(tokenizer_dir: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=400, n_layers=2)).eval()
    enc = load_encoder(tokenizer_dir, eos_id=1, need_chat=False)
    examples = [
        encode_example(example_pieces(r, DataFormat(), enc, "x"), enc, add_eos=True)
        for r in instruction_records(3)
    ]
    packed = make_rows(examples, 128, packing=True, pad_id=2)
    assert len(packed) == 1 and packed.segments.max() == 3
    padded = make_rows(examples, 128, packing=False, pad_id=2)
    assert len(padded) == 3
    with torch.no_grad():
        mask = packed_attention_mask(packed.segments)
        packed_loss = model(packed.inputs, positions=packed.positions, attn_mask=mask, targets=packed.targets)
        total = n = 0.0
        for i in range(3):  # each example alone, no padding at all
            x, t = torch.tensor([examples[i][0]]), torch.tensor([examples[i][1]])
            k = (t != IGNORE_INDEX).sum().item()
            total += model(x, targets=t).item() * k
            n += k
    torch.testing.assert_close(packed_loss.item(), total / n, rtol=1e-5, atol=1e-5)
    # the stage's loss (padding-free: real tokens flattened, attention per example) for both layouts
    with torch.no_grad():
        for rows in (packed, padded):
            batch = (rows.inputs, rows.targets, rows.positions, rows.segments)
            torch.testing.assert_close(varlen_loss(model, batch).item(), total / n, rtol=1e-5, atol=1e-5)
    # the mask: a token of example 2 sees nothing of example 1
    first = (packed.segments[0] == 1).nonzero().max().item()
    assert not mask[0, 0, first + 1, : first + 1].any()


def test_head_on_scored_positions_only_same_loss_and_gradients() -> None:
    import copy

    from lmforge.components.finetune.task import apply_scored_positions_only

    torch.manual_seed(0)
    plain = Transformer(ModelConfig.from_name("tiny", vocab_size=400, n_layers=2))
    compact = apply_scored_positions_only(copy.deepcopy(plain))
    inputs = torch.randint(0, 400, (2, 12))
    targets = torch.randint(0, 400, (2, 12))
    targets[0, :7] = IGNORE_INDEX  # a prompt
    targets[1, 9:] = IGNORE_INDEX  # padding
    a, b = plain(inputs, targets=targets), compact(inputs, targets=targets)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (name, p), q in zip(plain.named_parameters(), compact.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(plain(inputs), compact(inputs))  # logits: the hook stays out of the way


def test_dataset_order_independent_of_workers_and_resumable() -> None:
    rows = make_rows([([i, i], [i, i]) for i in range(10)], 4, packing=False, pad_id=0)
    one = SFTDataset(rows, seed=3)
    two = [SFTDataset(rows, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # the same micro-batches, wherever they run
        for r in range(2):
            assert torch.equal(one.next_batch(2)[0], two[r].next_batch(2)[0])
    state = one.state_dict()
    expected = one.next_batch(8)[0]  # wraps into the second epoch
    again = SFTDataset(rows, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(8)[0], expected)


# ---- end to end, in-process -----------------------------------------------------------------
TRAINED: dict[str, torch.nn.Module] = {}  # the live model of the last in-process run, by test


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir: Path, train_file: Path):
    from lmforge.components.finetune.stage import finetune
    from lmforge.components.finetune.task import FinetuneTask

    build = FinetuneTask.build_model

    def keep(self, cfg, model_cfg):  # in-process: the model the loop trains, kept for the tests
        TRAINED["lora"] = build(self, cfg, model_cfg)
        return TRAINED["lora"]

    root = tmp_path_factory.mktemp("lora")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = make_config(
        base_dir,
        train_file,
        root / "out",
        "tracking.enabled=true",
        f"tracking.tracking_uri={uri}",
        "merge=true",
        "register.model_name=fox-adapter",
        "packing=true",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FinetuneTask, "build_model", keep)
        return finetune(cfg), uri


def test_lora_writes_a_peft_adapter_recording_the_base(lora_run, base_dir: Path) -> None:
    result, _ = lora_run
    assert result.step == 4 and result.adapter_dir == result.output_dir / "adapter"
    names = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(base_dir)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # it trained
    assert result.metrics["model/trainable_pct"] < 10 and result.data_stats["train"]["kept"] == 16
    # training memory: the peak minus the process before the model was built
    assert 0 < result.metrics["train/peak_train_mem_gb"] < result.metrics["train/peak_mem_gb"]


def test_only_adapter_parameters_change(lora_run, base_dir: Path) -> None:
    result, _ = lora_run
    base = load_state_dict(base_dir)
    trained = TRAINED["lora"].state_dict()  # the model as the loop left it
    assert any(".lora_" in name for name in trained)
    for name, tensor in trained.items():
        if ".lora_" in name or name == "lm_head.weight":  # (tied: stored as the embedding)
            continue
        original = base[name.replace(".base_layer.", ".")]
        assert torch.equal(tensor, original), f"{name} changed"
    # so the checkpoint holds the trainable parameters (the adapters) only, not a copy of the base
    assert not (result.checkpoint_dir / "model").exists()
    saved = load_file(result.checkpoint_dir / "trainable.safetensors")
    assert (
        result.checkpoint_dir / "trainable.safetensors"
    ).stat().st_mode & 0o044  # readable as the umask says
    assert saved and all(".lora_" in k for k in saved)
    assert saved.keys() == {k for k, v in TRAINED["lora"].named_parameters() if v.requires_grad}


def test_adapter_loads_with_peft_onto_the_hf_export_same_logits(lora_run, base_dir: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lmforge.components.finetune.stage import preflight, trained_model

    result, _ = lora_run
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(result.adapter_dir)).eval()
    cfg = load_finetune_config(result.output_dir / "config.yaml", [])
    ours = trained_model(preflight(cfg), result.checkpoint_dir)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
        # merged == base + adapter, and `lmforge merge` writes the same model
        merged = load_model_dir(result.merged_dir)
        torch.testing.assert_close(merged(ids), ours(ids), rtol=1e-4, atol=1e-4)


def test_merge_cli_matches_base_plus_adapter(lora_run, base_dir: Path, tmp_path: Path) -> None:
    from lmforge.cli.entrypoint import main

    result, _ = lora_run
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                str(result.adapter_dir),
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        torch.testing.assert_close(
            load_model_dir(tmp_path / "m")(ids), load_model_dir(result.merged_dir)(ids)
        )
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_merge_refuses_bad_input(tmp_path: Path, base_dir: Path) -> None:
    from lmforge.cli.entrypoint import main

    assert (
        main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path), "--output", str(tmp_path / "m")])
        == 2
    )


def test_mlflow_run_and_registered_adapter_version(lora_run, base_dir: Path) -> None:
    from mlflow import MlflowClient

    result, uri = lora_run
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["derived.trainable_params"] == str(int(result.metrics["model/trainable_params"]))
    assert "val/loss" in run.data.metrics and "model/trainable_pct" in run.data.metrics
    assert run.data.tags["lmforge.stage"] == "finetune"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    version = client.get_model_version("fox-adapter", result.registered_version)
    assert version.tags["base_model"] == str(base_dir) and version.tags["lmforge.kind"] == "lora-adapter"
    assert version.source.endswith("/adapter")


def test_exact_resume(tmp_path: Path, base_dir: Path, train_file: Path) -> None:
    from lmforge.components.finetune.stage import finetune

    straight = finetune(make_config(base_dir, train_file, tmp_path / "a"))
    middle = straight.output_dir / "checkpoints" / "step-00000002"
    resumed = finetune(make_config(base_dir, train_file, tmp_path / "b"), resume=str(middle))
    assert resumed.step == 4
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint holds no base: resuming onto other base weights is refused (before Ray starts)
    from lmforge.components.pretrain.checkpointing import CheckpointError, consolidate

    other = tmp_path / "other-base"
    shutil.copytree(base_dir, other)
    state = load_state_dict(other)
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="trained on another base model"):
        finetune(make_config(other, train_file, tmp_path / "c"), resume=str(middle))
    with pytest.raises(CheckpointError, match="holds only the trainable parameters"):
        consolidate(middle, tmp_path / "whole")


def test_full_finetune_writes_a_model(tmp_path: Path, base_dir: Path, train_file: Path) -> None:
    from lmforge.components.finetune.stage import finetune

    result = finetune(
        make_config(base_dir, train_file, tmp_path / "full", "method=full", "schedule.max_steps=2")
    )
    assert result.adapter_dir is None and (result.merged_dir / "config.json").is_file()
    assert result.metrics["model/trainable_pct"] == 100.0
    assert not torch.equal(
        load_state_dict(result.merged_dir)["model.embed_tokens.weight"],
        load_state_dict(base_dir)["model.embed_tokens.weight"],
    )


# ---- bad input: refused before Ray starts ---------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "records", "message"),
    [
        (["base_model=/nonexistent/base"], None, "base_model: /nonexistent/base does not exist"),
        ([], [{"prompt": "x"}], "field 'response' is missing"),
        (["method=qlora"], None, "method=qlora needs a quantized base"),
        (
            ["lora.target_modules='blocks\\.\\d+\\.attn'"],
            None,
            "matches no module of the base model; valid names",
        ),
        (["max_seq_len=4096"], None, "exceeds the base model's context"),
        (["data.train=/nonexistent.jsonl"], None, "data.train: /nonexistent.jsonl does not exist"),
    ],
)
def test_bad_input_refused_before_ray(
    tmp_path, base_dir, train_file, overrides, records, message, monkeypatch
) -> None:
    import ray

    from lmforge.cli.entrypoint import main

    # The session's shared Ray may already be up (other tests): what matters is that this call never
    # reaches Ray, so any attempt to start or use it fails the test.
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was used before the bad input was refused")

    was_up = ray.is_initialized()
    from lmforge.components.pretrain import trainer

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(trainer, "_ensure_ray", no_ray)
    monkeypatch.setattr(trainer, "TorchTrainer", no_ray)

    train = write_jsonl(tmp_path / "bad.jsonl", records) if records else train_file
    if records:
        overrides = [*overrides, f"data.validation={train}"]
    cfg = make_config(base_dir, train, tmp_path / "out", "ray.num_workers=2", *overrides)
    from lmforge.components.finetune.stage import finetune
    from lmforge.errors import USER_ERRORS

    with pytest.raises(USER_ERRORS) as err:
        finetune(cfg)
    assert message in str(err.value)
    assert ray.is_initialized() == was_up
    # the CLI: one line, exit 2
    (tmp_path / "c.yaml").write_text("")
    args = ["finetune", "--config", str(tmp_path / "c.yaml")]
    for key, value in [("base_model", cfg.base_model), ("data.train", cfg.data.train)]:
        args += ["--set", f"{key}={value}"]
    args += ["--set", f"output_dir={tmp_path / 'cli'}", *sum((["--set", o] for o in overrides), [])]
    assert main(args) == 2


# ---- QLoRA: adapters over a frozen int8 / int4 base from `lmforge quantize` -----------------
@pytest.mark.parametrize(("method", "bits"), [("int8", 8), ("int4", 4)])
def test_qlora_trains_adapters_over_the_quantized_base(
    tmp_path, base_dir, train_file, method, bits, monkeypatch
) -> None:
    from lmforge.components.finetune.stage import finetune
    from lmforge.components.finetune.task import FinetuneTask
    from lmforge.components.quantize.stage import quantize

    quantized = quantize(
        base_dir, tmp_path / "q", method=method, group_size=16
    ).output_dir  # 16 divides d_ff=176
    build = FinetuneTask.build_model
    monkeypatch.setattr(
        FinetuneTask, "build_model", lambda *a: TRAINED.__setitem__("qlora", build(*a)) or TRAINED["qlora"]
    )
    result = finetune(
        make_config(
            quantized,
            train_file,
            tmp_path / "out",
            "method=qlora",
            f"qlora.bits={bits}",
            "schedule.max_steps=2",
        )
    )
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(".lora_" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    base = load_state_dict(quantized)
    trained = TRAINED["qlora"].state_dict()  # the model as the loop left it
    assert sum(".lora_" not in n for n in trained) >= len(base) - 1  # (the embedding is read from the head)
    for name, tensor in trained.items():
        if ".lora_" not in name:  # the int weights, scales and the rest: bit-identical
            assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), name
    assert all(".lora_" in k for k in load_file(result.checkpoint_dir / "trainable.safetensors"))
    wrong = 4 if bits == 8 else 8
    with pytest.raises(ConfigError, match=f"qlora.bits={wrong} but the base"):
        finetune(make_config(quantized, train_file, tmp_path / "o2", "method=qlora", f"qlora.bits={wrong}"))
    with pytest.raises(ConfigError, match="method=lora trains an fp32 base: use method=qlora"):
        finetune(make_config(quantized, train_file, tmp_path / "o3"))


def test_qlora_merge_refused() -> None:
    with pytest.raises(ConfigError, match="merge=true with method=qlora"):
        load_finetune_config(None, ["base_model=x", "data.train=t.jsonl", "method=qlora", "merge=true"])


def test_qlora_body_layers_recompute_the_weight_with_the_same_gradients(tmp_path, base_dir) -> None:
    import copy

    from lmforge.components.finetune.task import recompute_dequantized_weight
    from lmforge.components.quantize.stage import quantize
    from lmforge.model.quantized import QuantizedLinear

    plain = load_model_dir(quantize(base_dir, tmp_path / "q", method="int8").output_dir)
    patched = copy.deepcopy(plain)
    for module in patched.modules():
        if isinstance(module, QuantizedLinear) and module is not patched.lm_head:
            recompute_dequantized_weight(module)
    ids = torch.randint(0, 400, (2, 10))
    losses = []
    for model in (plain, patched):
        model.model.embed_tokens.weight.requires_grad_(True)
        loss = model(ids, targets=ids)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(plain.model.embed_tokens.weight.grad, patched.model.embed_tokens.weight.grad)
