"""Hugging Face interop: lmforge model directories ARE LlamaForCausalLM checkpoints, both ways.

Parity is checked against transformers' own implementation on random weights (fp32, 1e-4)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency used to verify interop"
)

from lmforge.components.hf_interop import export_hf, import_hf  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.model.checkpoint import ModelDirError, load_model_dir, save_model_dir  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.generation import SamplingParams  # noqa: E402
from lmforge.model.hf_format import UnsupportedArchitecture  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _copy_tokenizer(tokenizer_dir: Path, directory: Path) -> None:
    """Put the tiny test tokenizer's files into a model directory."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lmforge_model_loads_in_transformers_with_equal_logits(tmp_path, tie):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", tie_embeddings=tie)).eval()
    save_model_dir(model, tmp_path / "m")
    ids = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(tmp_path / "m", ids), ours, atol=1e-4, rtol=1e-4)
    # and the round trip through our own loader is exact, tying preserved
    reloaded = load_model_dir(tmp_path / "m")
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), ours, atol=0, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_llama_checkpoint_imports_with_equal_logits(tmp_path, tokenizer_dir, tie):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        eos_token_id=[1, 2],
        bos_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    _copy_tokenizer(tokenizer_dir, tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "lmf")
    assert result.num_params == sum(p.numel() for p in hf.parameters())
    ours = load_model_dir(tmp_path / "lmf")
    assert ours.config.rope_theta == 50000.0 and ours.config.n_kv_heads == 2 and ours.config.eos_token_id == 1
    ids = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    # the source's generation config (two eos ids) survives the import
    assert json.loads((tmp_path / "lmf" / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    assert (tmp_path / "lmf" / "tokenizer.json").is_file()


def test_export_writes_a_clean_hf_directory_with_dtype(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    save_model_dir(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m", extra_metadata={"run": "x"})
    _copy_tokenizer(tokenizer_dir, tmp_path / "m")
    result = export_hf(tmp_path / "m", tmp_path / "hf", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    assert not (tmp_path / "hf" / "lmforge.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("the fox")["input_ids"]


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model_dir(tmp_path / "hf")(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_pickled_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    save_model_dir(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelDirError, match="only pickled weights.*safetensors only"):
        load_model_dir(tmp_path / "m")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        (
            {
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5},
                "rope_scaling": {"rope_type": "llama3"},
            },
            "rope",
        ),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
    ],
)
def test_unsupported_architectures_name_the_field(tmp_path, change, field):
    torch.manual_seed(0)
    save_model_dir(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(UnsupportedArchitecture, match=field):
        import_hf(tmp_path / "m", tmp_path / "out", allow_missing_tokenizer=True)


def test_import_needs_a_matching_fast_tokenizer(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    save_model_dir(Transformer(ModelConfig.from_name("tiny", vocab_size=280)), tmp_path / "m")
    with pytest.raises(UserError, match="no tokenizer.json"):
        import_hf(tmp_path / "m", tmp_path / "out")
    _copy_tokenizer(tokenizer_dir, tmp_path / "m")  # 400 ids
    with pytest.raises(UserError, match="does not belong to these weights"):
        import_hf(tmp_path / "m", tmp_path / "out")


def test_weights_not_matching_config_are_refused(tmp_path):
    torch.manual_seed(0)
    save_model_dir(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_hidden_layers": 3}))
    with pytest.raises(ModelDirError, match="missing: \\['model.layers.2"):
        load_model_dir(tmp_path / "m")


SMOLLM2_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "reference_tokenizers" / "smollm2"


@pytest.mark.parametrize("prompt", ["The quick brown fox", "def add(a, b):\n    return"])
def test_imported_model_generates_what_transformers_generates(tmp_path, prompt):
    """A Hugging Face model whose tokenizer adds no bos (SmolLM2's has no bos post-processor) is
    prompted with exactly transformers' ids, so greedy decoding gives the same tokens (regression:
    lmforge used to prepend the config's bos_token_id to every prompt)."""
    from lmforge.serving.textgen import generate_from_dir

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=49152,  # SmolLM2's vocabulary
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked random logits: greedy choices are far from ties
        tie_word_embeddings=True,
        bos_token_id=1,  # <|im_start|>, as in SmolLM2's config.json
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOLLM2_TOKENIZER / name, tmp_path / "hf" / name)
    import_hf(tmp_path / "hf", tmp_path / "lmf")

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt_ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert prompt_ids[0, 0].item() != hf_cfg.bos_token_id  # the tokenizer adds no bos
    with torch.no_grad():
        expected = hf.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=hf_cfg.eos_token_id,
        )[0, prompt_ids.shape[1] :].tolist()

    ours = generate_from_dir(tmp_path / "lmf", prompt, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert ours.prompt_tokens == prompt_ids.shape[1]
    assert ours.token_ids == expected
