"""Pruning: global magnitude (exact sparsity, one threshold across layers), structured (smaller matrices,
a valid Llama directory that transformers loads with the same logits, exact when the removed units are
dead), the recovery fine-tune (zeros stay zeros), the CLI, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _compress_data import one_thread, train_tiny_model

from lmforge.cli import main as cli_main
from lmforge.components.prune import PruneConfig, prune
from lmforge.components.prune.magnitude import magnitude_prune, prunable_weights
from lmforge.components.prune.structured import structured_prune
from lmforge.config import build
from lmforge.errors import ConfigError, UserError
from lmforge.model import ModelConfig, Transformer, load_model_dir
from lmforge.model.checkpoint import read_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _one_thread) -> tuple[Path, Path]:
    return train_tiny_model(tmp_path_factory.mktemp("prune"), steps=30)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", **overrides)).eval()


def cfg(**values) -> PruneConfig:
    return build(PruneConfig, values)


# ---- magnitude ---------------------------------------------------------------------------------
def test_magnitude_reaches_the_sparsity_with_one_global_threshold() -> None:
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(10.0)  # a layer of large weights loses less
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    report = magnitude_prune(model, 0.6)
    weights = list(prunable_weights(model).values())
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros - round(0.6 * total)) <= 1 and report["sparsity"] == pytest.approx(0.6, abs=1e-4)
    layers = report
    assert (
        layers["layer/model.layers.1.mlp.up_proj.weight"]
        < 0.1
        < layers["layer/model.layers.0.mlp.up_proj.weight"]
    )
    # every surviving weight is at least as large as every pruned one
    kept_min = min(float(w.detach()[w != 0].abs().min()) for w in weights)
    assert kept_min > 0
    for n, p in model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, norms_before[n])  # gains are never pruned
    assert float(model.model.embed_tokens.weight.eq(0).float().mean()) == 0.0  # embeddings kept by default


def test_magnitude_stage_writes_a_loadable_model_with_report(trained, tmp_path: Path) -> None:
    shards, model_dir = trained
    result = prune(
        cfg(model=str(model_dir), output=str(tmp_path / "m"), sparsity=0.8, data=str(shards)), verbose=False
    )
    pruned = load_model_dir(result.model_dir)
    assert pruned.config == read_config(model_dir)  # same shapes
    report = json.loads((result.model_dir / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert json.loads((result.model_dir / "lmforge.json").read_text())["prune"]["method"] == "magnitude"
    q = report["quality"]
    # (a model this briefly trained may even improve when its noisy block weights go: only measured)
    assert (
        q["pruned"]["loss"] != q["before"]["loss"]
        and q["loss_change"] == q["pruned"]["loss"] - q["before"]["loss"]
    )
    assert (result.model_dir / "tokenizer.json").is_file()


# ---- structured --------------------------------------------------------------------------------
def test_structured_shrinks_the_matrices_and_transformers_agrees(trained, tmp_path: Path) -> None:
    shards, model_dir = trained
    result = prune(
        cfg(
            model=str(model_dir),
            output=str(tmp_path / "s"),
            sparsity=0.5,
            method="structured",
            data=str(shards),
        ),
        verbose=False,
    )
    before, after = read_config(model_dir), read_config(result.model_dir)
    assert (after.n_kv_heads, after.n_heads, after.head_dim) == (1, 2, before.head_dim)
    assert after.d_ff == 88 and after.d_model == before.d_model
    model = load_model_dir(result.model_dir)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * before.head_dim, before.d_model)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (before.d_model, 88)
    report = result.report
    assert 0.45 < report["sparsity"] < 0.55 and report["params_after"] < report["params_before"]
    assert report["scores"] == "activations"

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = torch.randint(0, before.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_structured_removing_dead_units_changes_nothing() -> None:
    """Channels whose down_proj column is zero and a kv-group whose o_proj columns are zero contribute
    nothing: weight scores rank them last, and removing them leaves the logits unchanged."""
    model = tiny(n_layers=2)
    cfg_ = model.config
    group_cols = cfg_.n_heads // cfg_.n_kv_heads * cfg_.head_dim
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight[:, 1::2] = 0.0  # half the channels dead
            block.self_attn.o_proj.weight[:, :group_cols] = 0.0  # kv-group 0 dead
    ids = torch.randint(0, cfg_.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(ids)
    pruned, report = structured_prune(model, 0.5)
    assert pruned.config.d_ff == cfg_.d_ff // 2 and pruned.config.n_kv_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), expected, atol=1e-5, rtol=1e-5)
    assert report["n_heads_after"] == 2


def test_structured_options_mlp_only_and_multiple_of() -> None:
    model = tiny()
    pruned, _ = structured_prune(model, 0.3, heads=False, multiple_of=16)
    assert pruned.config.n_heads == 4 and pruned.config.d_ff % 16 == 0 and pruned.config.d_ff < 176


# ---- recovery ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_recovery_fine_tune_keeps_zeros_and_lowers_the_loss(trained, tmp_path: Path, method: str) -> None:
    shards, model_dir = trained
    c = cfg(
        model=str(model_dir),
        output=str(tmp_path / "r"),
        sparsity=0.6,
        method=method,
        data=str(shards),
        recovery={"steps": 8, "lr": 2e-3, "seq_len": 64, "global_batch_size": 8, "micro_batch_size": 4},
    )
    result = prune(c, verbose=False)
    q = result.report["quality"]
    assert q["recovered"]["loss"] < q["pruned"]["loss"]
    model = load_model_dir(result.model_dir)
    if method == "magnitude":
        assert result.report["sparsity_after_recovery"] >= 0.6 - 1e-4  # the zeros stayed zeros
        weights = list(prunable_weights(model).values())
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros >= 0.6 - 1e-4
    else:
        assert model.config.d_ff < read_config(model_dir).d_ff
    assert (tmp_path / "r-recovery" / "checkpoints").is_dir()


# ---- CLI and bad input -------------------------------------------------------------------------
def test_cli_prune(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards, model_dir = trained
    out = tmp_path / "cli"
    args = [
        "prune",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--sparsity",
        "0.5",
        "--method",
        "structured",
    ]
    assert cli_main(args + ["--data", str(shards), "--set", "structured.heads=false"]) == 0
    printed = capsys.readouterr().out
    assert "pruned" in printed and '"d_ff_after": 88' in printed
    assert read_config(out).n_heads == read_config(model_dir).n_heads
    # bad input: one line, exit 2
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args[:-1] + ["pyramid"])
    assert exit_info.value.code == 2
    assert (
        cli_main(
            [
                "prune",
                "--model",
                str(tmp_path / "none"),
                "--output",
                str(out),
                "--sparsity",
                "0.5",
                "--method",
                "magnitude",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "config.json is missing" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "values, message",
    [
        ({"sparsity": 1.5}, "sparsity must be in (0, 1)"),
        ({"sparsity": 0.0}, "sparsity must be in (0, 1)"),
        ({"method": "random"}, "method='random' is not one of"),
        ({"recovery": {"steps": 3}}, "needs data"),
        ({"structured": {"mlp": False, "heads": False}}, "nothing to prune"),
    ],
)
def test_bad_config_is_a_clear_error(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(model="m", output="o", **values)
    assert message in str(err.value)


def test_bad_paths_fail_before_work(trained, tmp_path: Path) -> None:
    shards, model_dir = trained
    with pytest.raises(UserError, match="is the input model directory"):
        prune(cfg(model=str(model_dir), output=str(model_dir)), verbose=False)
    with pytest.raises(UserError, match="does not exist"):
        prune(
            cfg(model=str(model_dir), output=str(tmp_path / "x"), data=str(tmp_path / "nodata")),
            verbose=False,
        )
    with pytest.raises(ConfigError, match="removes nothing"):
        prune(
            cfg(
                model=str(model_dir),
                output=str(tmp_path / "y"),
                method="structured",
                sparsity=0.01,
                structured={"mlp": False},
            ),
            verbose=False,
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a model directory; it would be replaced"):
        prune(cfg(model=str(model_dir), output=str(tmp_path / "notes")), verbose=False)
    assert (tmp_path / "notes" / "todo.txt").is_file()
