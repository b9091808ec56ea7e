"""Constrained decoding: restrict which tokens a sequence may produce next.

A constraint is any object with `allowed_tokens(generated) -> bool mask (V,) | None`, a pure
function of the tokens generated so far (so one constraint object can serve all `n` samples of a
request, and the engine needs no per-constraint state). `None` means "anything"; a mask with no
True entry ends the sequence (finish_reason "stop"). The mask is applied after penalties and
before temperature / top-k / top-p, so sampling renormalises over the allowed tokens only.

Two constraints are provided:
- `AllowedTokens`: a fixed allow-list (classification labels, digits only, a closed vocabulary).
- `RegexConstraint` (in `serving/textgen.py`, because it needs the tokenizer's text and the
  `regex` package): the output must match a regular expression, e.g. `(yes|no)` or
  `\\d{4}-\\d{2}-\\d{2}`; generation ends by itself when the match is complete and cannot grow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    def allowed_tokens(self, generated: Sequence[int]) -> torch.Tensor | None:
        """Bool mask (V,) of the tokens allowed after `generated`; None = no restriction."""
        ...


class AllowedTokens:
    """Only the given token ids may be produced (plus `end_token_ids`, e.g. eos, if given).

    `max_tokens` ends the sequence after that many tokens (an empty mask), which is how a
    single-token classification answer is expressed without touching max_new_tokens."""

    def __init__(
        self,
        token_ids: Iterable[int],
        vocab_size: int,
        end_token_ids: Iterable[int] = (),
        max_tokens: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        ids = sorted(set(token_ids) | set(end_token_ids))
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"allowed token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        if not ids:
            raise ValueError("the allow-list is empty: no token could ever be produced")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.mask[ids] = True
        self.max_tokens = max_tokens
        self._empty = torch.zeros_like(self.mask)

    def allowed_tokens(self, generated: Sequence[int]) -> torch.Tensor | None:
        if self.max_tokens is not None and len(generated) >= self.max_tokens:
            return self._empty
        return self.mask
