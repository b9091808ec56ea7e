"""`lmforge generate` end to end on a tiny model directory (weights + tokenizer.json), through the real
entry point `lmforge.cli.main`: its argument parsing, its error mapping and its exit codes."""

import pytest
import torch

from lmforge.cli import main
from lmforge.components.tokenizer import TokenizerInfo
from lmforge.model.checkpoint import save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=info.vocab_size,
        init_std=0.2,
        tie_embeddings=False,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
    )
    root = tmp_path_factory.mktemp("gen")
    return save_model_dir(Transformer(cfg).eval(), root / "model", tokenizer_dir=tokenizer_dir)


def cli(argv: list[str]) -> int:
    """`lmforge generate ...` as the installed command runs it (user errors: one line on stderr, exit 2)."""
    return main(["generate", *argv])


def test_greedy_is_deterministic_and_streaming_prints_the_same(model_dir, capsys):
    base = [
        "--model",
        str(model_dir),
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
    ]
    assert cli(base) == 0
    first = capsys.readouterr().out
    assert cli(base) == 0
    assert capsys.readouterr().out == first
    assert cli([*base, "--stream", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert captured.out == first and len(first.strip()) > 0
    assert "time to first token" in captured.err and "tokens/s" in captured.err


def test_seeded_sampling_and_prompt_file(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Crème brûlée", encoding="utf-8")
    args = [
        "--model",
        str(model_dir),
        "--prompt-file",
        str(prompt),
        "--max-new-tokens",
        "15",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "3",
    ]
    assert cli(args) == 0
    a = capsys.readouterr().out
    assert cli(args) == 0
    assert capsys.readouterr().out == a
    assert cli([*args[:-1], "4"]) == 0
    assert capsys.readouterr().out != a


def test_beam_search_regex_and_draft_model(model_dir, capsys):
    base = ["--model", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "8"]
    assert cli([*base, "--num-beams", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert cli([*base, "--regex", r"\d{4}", "--temperature", "1", "--seed", "0"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out) == 4 and out.isdigit()
    assert cli([*base, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert cli([*base, "--temperature", "0", "--draft-model", str(model_dir)]) == 0
    assert capsys.readouterr().out == greedy  # speculative greedy == greedy


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "1.5"], "sampling.top_p"),
        (["--temperature", "-1"], "sampling.temperature"),
        (["--max-new-tokens", "100000"], "exceeds the context"),
        (["--num-beams", "2", "--stream"], "--stream cannot be combined"),
        (["--num-beams", "2", "--regex", "a"], "cannot be combined"),
        (["--regex", "(bad"], "invalid --regex"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(model_dir, capsys, extra, message):
    assert cli(["--model", str(model_dir), "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge generate: error: ") and message in err
    assert "Traceback" not in err  # a user error, not a bug


def test_missing_model_or_tokenizer(model_dir, tmp_path, capsys):
    assert cli(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not a directory" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((model_dir / name).read_bytes())
    assert cli(["--model", str(no_tok), "--prompt", "hi"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_prompt_and_prompt_file_are_exclusive(model_dir):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        cli(["--model", str(model_dir), "--prompt", "a", "--prompt-file", "b"])
    assert exit_info.value.code == 2
