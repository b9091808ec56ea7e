"""Pretraining without Ray: config validation, optimizer groups and schedules, the in-process loop
(exact resume after SIGTERM, mixed precision, activation checkpointing, FSDP/DeepSpeed on one
process), checkpoints, consolidation, MLflow tracking and the CLI.

The Ray Train paths (2 workers, worker-kill recovery, ZeRO-2, FSDP) are in test_pretrain_ray.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from _pretrain_data import REPO, build_sample_shards, tiny_config

from lmforge.cli import main as cli_main
from lmforge.components.pretrain import checkpointing, consolidate, pretrain
from lmforge.components.pretrain import trainer as _ray_trainer_module
from lmforge.components.pretrain.config import PretrainConfig
from lmforge.components.pretrain.optim import lr_multiplier, param_groups
from lmforge.config import build, load
from lmforge.model import ModelConfig, Transformer, load_model_dir
from lmforge.model.config import ConfigError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_sample_shards(tmp_path_factory.mktemp("pretrain-data"))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_dir(model_dir).state_dict()


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if atol == 0.0:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


# ---- config validation (no data, no Ray) ---------------------------------------------------------
BASE = {
    "data": {"shards_dir": "/nonexistent", "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 2},
    "ray": {"num_workers": 2},
}


@pytest.mark.parametrize(
    "override, field",
    [
        ("strategy.name=horovod", "strategy.name"),
        ("data.global_batch_size=6", "data.global_batch_size"),  # 6 % (2 micro x 2 workers) != 0
        ("ray.num_workers=3", "data.global_batch_size"),  # 8 % (2 x 3) != 0
        ("strategy.zero_stage=4", "strategy.zero_stage"),
        ("schedule.warmup_steps=5000", "schedule.warmup_steps"),
        ("data.seq_len=4096", "data.seq_len"),  # tiny's context is 256
        ("model.overrides.n_layerz=3", "model.overrides"),
        ("model.preset=gpt5", "model.preset"),
        ("precision.dtype=fp8", "precision.dtype"),
        ("optim.no_decay=[norm,gain]", "optim.no_decay"),
        ("optim.layer_lr_decay=1.5", "optim.layer_lr_decay"),
        ("optim.lr=fast", "optim.lr"),  # pydantic type check
        ("checkpoint.evry=3", "checkpoint.evry"),  # unknown key
    ],
)
def test_bad_config_names_the_field(override: str, field: str) -> None:
    from lmforge.config import apply_overrides

    with pytest.raises(ConfigError) as err:
        build(PretrainConfig, apply_overrides(json.loads(json.dumps(BASE)), [override]))
    assert field in str(err.value)


def test_yaml_configs_validate_and_seed_matches_the_brief() -> None:
    for name in ("pretrain-tiny.yaml", "pretrain-small.yaml", "seed-1.3b.yaml"):
        load(PretrainConfig, REPO / "configs" / name)
    seed = load(PretrainConfig, REPO / "configs" / "seed-1.3b.yaml")
    assert seed.model.preset == "seed-1.3b" and seed.data.seq_len == 2048
    assert (
        seed.data.global_batch_size == 512
        and seed.grad_accum_steps * seed.data.micro_batch_size * seed.world_size == 512
    )
    assert (seed.optim.lr, seed.schedule.warmup_steps, seed.schedule.max_steps) == (1e-4, 4000, 100_000)
    assert (seed.optim.beta1, seed.optim.beta2, seed.optim.weight_decay, seed.optim.grad_clip) == (
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert seed.precision.dtype == "fp16" and seed.strategy.name in ("fsdp", "deepspeed")
    assert seed.strategy.activation_checkpointing and seed.ray.use_gpu


def test_data_problems_fail_before_ray(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a config that cannot work")

    monkeypatch.setattr(_ray_trainer_module, "run_on_ray", no_ray)
    cases = [
        (tiny_config(tmp_path / "missing", tmp_path / "o1", "ray.num_workers=2"), "data.shards_dir"),
        (tiny_config(shards, tmp_path / "o2", "ray.num_workers=2", "eval.split=test"), "eval.split"),
        (
            tiny_config(shards, tmp_path / "o3", "ray.num_workers=2", "model.overrides.vocab_size=100"),
            "vocab_size",
        ),
    ]
    for cfg, field in cases:
        with pytest.raises(ConfigError) as err:
            pretrain(cfg)
        assert field in str(err.value)
        assert not (Path(cfg.output_dir) / "checkpoints").exists()


# ---- optimizer groups and schedule ---------------------------------------------------------------
def test_param_groups_exclude_norms_and_embeddings_and_apply_layer_decay() -> None:
    model = Transformer(ModelConfig.from_name("tiny", n_layers=3, tie_embeddings=False))
    cfg = build(PretrainConfig, {**BASE, "optim": {"weight_decay": 0.1, "layer_lr_decay": 0.5, "lr": 1.0}})
    groups = param_groups(model, 3, cfg.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())  # every parameter exactly once
    assert by_name["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert by_name["model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert by_name["model.layers.2.mlp.up_proj.weight"]["weight_decay"] == 0.1
    assert by_name["lm_head.weight"]["weight_decay"] == 0.1  # untied head decays like any matrix
    # depth: embedding 0, block i -> i+1, head 4; lr = 0.5 ** (4 - depth)
    assert by_name["lm_head.weight"]["lr"] == 1.0
    assert by_name["model.layers.2.self_attn.q_proj.weight"]["lr"] == 0.5
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["lr"] == 0.125
    assert by_name["model.embed_tokens.weight"]["lr"] == 0.0625

    tied = Transformer(ModelConfig.from_name("tiny", tie_embeddings=True))
    everything = build(PretrainConfig, {**BASE, "optim": {"no_decay": []}})
    names = [n for g in param_groups(tied, 2, everything.optim) for n in g["names"]]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: listed once
    assert all(
        g["weight_decay"] == everything.optim.weight_decay for g in param_groups(tied, 2, everything.optim)
    )


def test_schedules() -> None:
    def sched(**kw):
        return build(
            PretrainConfig,
            {**BASE, "schedule": {"max_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw}},
        ).schedule

    cos = sched(decay="cosine")
    assert [lr_multiplier(s, cos) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warmup reaches the peak
    assert lr_multiplier(10, cos) == 1.0
    assert lr_multiplier(60, cos) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(110, cos) == pytest.approx(0.1)
    lin = sched(decay="linear")
    assert lr_multiplier(35, lin) == pytest.approx(1 - 0.9 * 0.25)
    assert lr_multiplier(110, lin) == pytest.approx(0.1)
    assert lr_multiplier(80, sched(decay="constant")) == 1.0


# ---- the loop, in process ---------------------------------------------------------------------------
class _Batches:
    """Stands in for the validation dataset: fixed (inputs, targets) batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def iter_eval_batches(self, batch_size: int, max_batches: int):
        yield from self.batches[:max_batches]


def test_validation_loss_is_the_mean_over_scored_targets(tmp_path: Path) -> None:
    """Regression: evaluate turned each batch's mean into a sum with targets.numel(), which counts
    ignore_index targets (-100) too; batches with fewer scored targets were over-weighted."""
    from lmforge.components.pretrain import loop, strategies
    from lmforge.components.pretrain.env import RunEnv

    cfg = build(PretrainConfig, {**BASE, "ray": {"num_workers": 0}})
    env = RunEnv(tmp_path, 1, None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
    strategy = strategies.prepare(model, cfg, env)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for ignored in (0, 12, 16):  # all scored, most ignored, nothing scored
        inputs, targets = (
            torch.randint(0, 64, (2, 8), generator=gen),
            torch.randint(0, 64, (2, 8), generator=gen),
        )
        targets.view(-1)[:ignored] = loop.IGNORE_INDEX
        batches.append((inputs, targets))

    got = loop.evaluate(strategy, _Batches(batches), max_batches=3, batch_size=2, env=env)

    with torch.no_grad():
        losses = torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    model(x).flatten(0, 1), y.flatten(), ignore_index=loop.IGNORE_INDEX, reduction="none"
                )[y.flatten() != loop.IGNORE_INDEX]
                for x, y in batches
            ]
        )
    assert len(losses) == 16 + 4
    assert got["val/loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert model.training  # evaluation puts the model back into training mode


def test_sigterm_checkpoints_and_resume_is_exact(shards: Path, tmp_path: Path) -> None:
    """An uninterrupted run and a run stopped by SIGTERM at step 3 then resumed (--resume auto)
    end with bit-identical weights and loss curves; the resumed run continues the same MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = {"enabled": True, "tracking_uri": uri, "log_every": 1, "experiment": "t"}
    full = pretrain(tiny_config(shards, tmp_path / "full", tracking=track))
    assert not full.preempted and full.step == 6 and full.model_dir is not None

    def sigterm_at_3(step: int, rank: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into "checkpoint and stop"

    cfg = tiny_config(shards, tmp_path / "split", tracking=track)
    first = pretrain(cfg, on_step=sigterm_at_3)
    assert first.preempted and first.step == 3 and first.model_dir is None
    assert first.checkpoint_dir is not None and first.checkpoint_dir.name == "step-00000003"
    with pytest.raises(checkpointing.CheckpointError, match="--resume auto"):
        pretrain(cfg)  # a fresh run must not silently overwrite or continue existing checkpoints
    second = pretrain(cfg, resume="auto")
    assert second.step == 6 and not second.preempted and second.mlflow_run_id == first.mlflow_run_id

    assert_same_weights(full.model_dir, second.model_dir)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def curve(run_id: str, key: str) -> list[tuple[int, float]]:
        return [
            (m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]

    assert curve(full.mlflow_run_id, "train/loss") == curve(second.mlflow_run_id, "train/loss")
    assert [s for s, _ in curve(second.mlflow_run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert curve(full.mlflow_run_id, "val/loss") == curve(second.mlflow_run_id, "val/loss")

    # checkpoints: the last K complete ones, no staging leftovers, a manifest of every file
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    state = checkpointing.read_state(second.checkpoint_dir)
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 8 * 64 and state["strategy"] == "ddp"
    assert state["data"]["cursor"] == 6 * 8 and not checkpointing.missing_files(second.checkpoint_dir)
    for name in ("model/model.safetensors", "optimizer.pt", "train_state.pt", "rng/rank-0.pt"):
        assert name in state["files"]["0"]

    # MLflow: params, metrics, config artifact, loss curve, final model
    run = client.get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and int(run.data.params["model.num_params"]) > 0
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "train/tokens_per_s",
        "train/peak_mem_gb",
        "val/ppl",
    ):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(second.mlflow_run_id)}
    assert {"config.yaml", "loss_curve.png", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(second.mlflow_run_id, "model")} >= {
        "model/config.json",
        "model/model.safetensors",
    }
    assert (tmp_path / "split" / "loss_curve.png").stat().st_size > 1000
    # the final model directory carries the tokenizer and the run's provenance
    meta = json.loads((second.model_dir / "lmforge.json").read_text())
    assert meta["pretrain"]["step"] == 6 and (second.model_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(shards: Path, tmp_path: Path, dtype: str) -> None:
    from lmforge.components.pretrain import loop
    from lmforge.components.pretrain.env import RunEnv
    from lmforge.components.pretrain.tracking import Tracker

    cfg = tiny_config(
        shards,
        tmp_path / dtype,
        f"precision.dtype={dtype}",
        "schedule.max_steps=4",
        "precision.initial_scale=1024",
        "eval.every=0",
    )
    env = RunEnv(cfg.checkpoints_dir(), 2, None)
    result = loop.train(cfg, ModelConfig.from_name("tiny", vocab_size=512), env, Tracker())
    losses = [r["train/loss"] for r in result.history]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    scales = {r["train/loss_scale"] for r in result.history}
    if dtype == "bf16":
        assert scales == {1.0}
    else:  # dynamic loss scaling: starts at 1024, halves on overflow
        assert all(1 <= s <= 1024 for s in scales) and 1024 in scales | {max(scales) * 2}
    # fp32 master weights regardless of the compute precision
    assert (
        weights(consolidate(result.checkpoint, tmp_path / f"{dtype}-model"))["model.norm.weight"].dtype
        == torch.float32
    )


def test_activation_checkpointing_gives_the_same_training(shards: Path, tmp_path: Path) -> None:
    plain = pretrain(tiny_config(shards, tmp_path / "plain", "schedule.max_steps=2", "eval.every=0"))
    ckpt = pretrain(
        tiny_config(
            shards,
            tmp_path / "ac",
            "schedule.max_steps=2",
            "eval.every=0",
            "strategy.activation_checkpointing=true",
        )
    )
    assert_same_weights(plain.model_dir, ckpt.model_dir, atol=1e-6)


def test_fsdp_in_process_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    """FSDP2 on a one-process group: sharded (torch.distributed.checkpoint) save/load is exact and
    consolidates to the same model as DDP trains."""
    ddp = pretrain(tiny_config(shards, tmp_path / "ddp", "eval.every=0"))
    cfg = tiny_config(shards, tmp_path / "fsdp", "strategy.name=fsdp", "eval.every=0")

    def ctrl_c_at_3(step: int, rank: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C checkpoints and stops, like SIGTERM

    # the handler in place before (Python's default_int_handler, or SIG_IGN when the test process was
    # started in the background by a non-interactive shell) is the one restored afterwards
    before = signal.getsignal(signal.SIGINT)
    assert pretrain(cfg, on_step=ctrl_c_at_3).preempted
    assert signal.getsignal(signal.SIGINT) is before
    fsdp = pretrain(cfg, resume="auto")
    state = checkpointing.read_state(fsdp.checkpoint_dir)
    assert state["strategy"] == "fsdp" and any(f.endswith(".distcp") for f in state["files"]["0"])
    assert_same_weights(ddp.model_dir, fsdp.model_dir, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'lmforge[deepspeed]')")
def test_deepspeed_in_process_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    cfg = tiny_config(
        shards, tmp_path / "ds", "strategy.name=deepspeed", "strategy.zero_stage=1", "eval.every=0"
    )
    full = pretrain(
        tiny_config(
            shards, tmp_path / "ds-full", "strategy.name=deepspeed", "strategy.zero_stage=1", "eval.every=0"
        )
    )

    def stop_at_3(step: int, rank: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert pretrain(cfg, on_step=stop_at_3).preempted
    resumed = pretrain(cfg, resume="auto")
    assert_same_weights(full.model_dir, resumed.model_dir)


@pytest.mark.slow
def test_torch_compile_keeps_names_and_trains(shards: Path, tmp_path: Path) -> None:
    result = pretrain(
        tiny_config(
            shards, tmp_path / "compiled", "strategy.compile=true", "schedule.max_steps=2", "eval.every=0"
        )
    )
    assert math.isfinite(result.metrics["train/loss"])
    load_model_dir(result.model_dir)  # strict key check: compiling in place kept the parameter names


# ---- resume targets ---------------------------------------------------------------------------------
def test_resume_path_rules(shards: Path, tmp_path: Path) -> None:
    a = pretrain(tiny_config(shards, tmp_path / "a", "eval.every=0", "checkpoint.keep_last=5"))
    step2 = tmp_path / "a" / "checkpoints" / "step-00000002"
    # explicit PATH into a fresh output dir: continues from step 2 and reaches the same weights
    b = pretrain(tiny_config(shards, tmp_path / "b", "eval.every=0"), resume=str(step2))
    assert_same_weights(a.model_dir, b.model_dir)
    # an incomplete checkpoint (a file of its manifest missing) is never resumed from
    (step2 / "optimizer.pt").unlink()
    assert not checkpointing.is_complete(step2)
    with pytest.raises(checkpointing.CheckpointError, match="incomplete"):
        pretrain(tiny_config(shards, tmp_path / "c", "eval.every=0"), resume=str(step2))
    # a different checkpoint into a directory that already holds another run's checkpoints
    with pytest.raises(checkpointing.CheckpointError, match="another run"):
        pretrain(
            tiny_config(shards, tmp_path / "b", "eval.every=0"),
            resume=str(tmp_path / "a" / "checkpoints" / "step-00000004"),
        )
    with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
        pretrain(tiny_config(shards, tmp_path / "d", "eval.every=0"), resume=str(tmp_path / "nowhere"))


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_pretrain_and_consolidate(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = [
        "pretrain",
        "--config",
        str(REPO / "configs" / "pretrain-tiny.yaml"),
        "--local",
        "--set",
        f"data.shards_dir={shards}",
        "--set",
        f"output_dir={out}",
        "--set",
        "schedule.max_steps=3",
        "--set",
        "schedule.warmup_steps=1",
        "--set",
        "model.overrides.n_layers=1",
        "--set",
        "tracking.enabled=false",
        "--set",
        "eval.every=0",
    ]
    assert cli_main(args) == 0
    assert "pretrained" in capsys.readouterr().out
    assert load_model_dir(out / "model").config.vocab_size == 512
    assert cli_main(["consolidate", str(out / "checkpoints" / "step-00000003"), str(tmp_path / "copy")]) == 0
    assert_same_weights(out / "model", tmp_path / "copy")

    assert cli_main(args[:-2] + ["--set", "strategy.name=horovod"]) == 2
    assert "strategy.name" in capsys.readouterr().err
    assert cli_main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
