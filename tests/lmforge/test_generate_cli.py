"""`lmforge generate` end to end on a tiny model directory (weights + tokenizer.json)."""

import argparse

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.cli import generate as generate_cmd
from lmforge.errors import USER_ERRORS
from lmforge.model.checkpoint import save_model_dir
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234 5678.",
    "Crème brûlée, café — déjà vu! 日本語 🙂",
] * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=tok.get_vocab_size(),
        init_std=0.2,
        tie_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    return save_model_dir(Transformer(cfg).eval(), root / "model", tokenizer_dir=root / "tok")


def cli(argv: list[str]) -> int:
    """Parse and run like `lmforge generate ...` (user errors -> exit code 2, as lmforge.cli does)."""
    parser = argparse.ArgumentParser(prog="lmforge")
    generate_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *argv])
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}")
        return 2


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
    assert message in capsys.readouterr().out


def test_missing_model_or_tokenizer(model_dir, tmp_path, capsys):
    assert cli(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not a directory" in capsys.readouterr().out
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((model_dir / name).read_bytes())
    assert cli(["--model", str(no_tok), "--prompt", "hi"]) == 2
    assert "tokenizer.json" in capsys.readouterr().out


def test_prompt_and_prompt_file_are_exclusive(model_dir):
    with pytest.raises(SystemExit):
        cli(["--model", str(model_dir), "--prompt", "a", "--prompt-file", "b"])
