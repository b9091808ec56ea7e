"""Reading a tokenizer artifact: the one loader for stages, the CLI and the serving runtime.

A tokenizer directory (and every model directory) holds a Hugging Face `tokenizer.json`. The
tokenize stage, `lmforge generate` and the server all read it here, so a missing or malformed file
gives the same one-line error everywhere. It lives in the core layer because both the stages and
the serving runtime need it, and serving must not import a stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.errors import InputNotFoundError, UserError


class TokenizerFileError(UserError):
    """A tokenizer file is missing or malformed."""


class TokenizerNotFoundError(TokenizerFileError, InputNotFoundError):
    """The path holds no tokenizer.json (still a FileNotFoundError for callers)."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a tokenizer (or model) directory, or of a tokenizer.json file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerNotFoundError(
            f"no tokenizer at {path}: expected a directory with tokenizer.json "
            "(`lmforge tokenizer train` writes one; every model directory holds its own)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust loader raises a bare Exception on malformed JSON
        raise TokenizerFileError(f"{file} is not a valid tokenizer.json: {err}") from err
