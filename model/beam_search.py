"""Beam search over token ids, with length penalty, early stopping and diverse (group) beam search.

The beams are rows of one KV cache: the prompt is prefilled once and copied to every row, and
after each step the rows are reordered (`KVCache.select_rows`) so row i holds the history of the
beam now in position i. A hypothesis ends when it produces a stop token (eos by default) or
reaches max_new_tokens; its score is

    sum of token log-probabilities / (number of generated tokens) ** length_penalty

so length_penalty > 0 favours longer outputs, < 0 shorter ones, 0 compares raw log-likelihoods.

Stopping (per group): with `early_stopping=True` a group stops as soon as it holds `group size`
finished hypotheses. With False it stops only when no running beam can still beat the worst kept
hypothesis (an exact bound, so the result is what an unbounded search of that width finds).

Diverse beam search (Vijayakumar et al., 2016): the beams are split into `num_beam_groups` groups
decoded one after another at each step; group g's candidate tokens are penalised by
`diversity_penalty` times the number of times earlier groups chose that token at this step. The
penalty only steers selection: kept scores are true log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmforge.model.generation import SamplingParamsError
from lmforge.model.kv_cache import KVCache

if TYPE_CHECKING:
    from lmforge.model.transformer import CausalLM


@dataclass(frozen=True)
class BeamSearchParams:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise SamplingParamsError(f"beam_search.{name} {rule}, got {getattr(self, name)!r}")

        for name in ("num_beams", "max_new_tokens", "num_return_sequences", "num_beam_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be an integer >= 1")
        if self.num_beams % self.num_beam_groups != 0:
            fail("num_beam_groups", f"must divide num_beams={self.num_beams}")
        if self.num_return_sequences > self.num_beams:
            fail("num_return_sequences", f"must be <= num_beams={self.num_beams}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            fail("length_penalty", "must be a finite number")
        if not isinstance(self.diversity_penalty, (int, float)) or not 0 <= self.diversity_penalty < math.inf:
            fail("diversity_penalty", "must be a finite number >= 0")
        if self.diversity_penalty > 0 and self.num_beam_groups == 1:
            fail("diversity_penalty", "needs num_beam_groups > 1 (diversity is between groups)")


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, the stop token included when there is one
    logprob: float  # sum of the tokens' log-probabilities
    score: float  # logprob / len(token_ids) ** length_penalty
    finished: bool  # True if it ended with a stop token, False if it ran into max_new_tokens


class _Kept:
    """The best `size` hypotheses of one group."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size, self.length_penalty = size, length_penalty
        self.items: list[Hypothesis] = []

    def add(self, tokens: list[int], logprob: float, finished: bool) -> None:
        score = logprob / (len(tokens) ** self.length_penalty)
        if len(self.items) < self.size or score > self.items[-1].score:
            self.items.append(Hypothesis(tuple(tokens), logprob, score, finished))
            self.items.sort(key=lambda h: h.score, reverse=True)
            del self.items[self.size :]

    def is_done(self, best_running: float, generated: int, max_new_tokens: int, early: bool) -> bool:
        """No running beam (best log-prob sum `best_running` after `generated` tokens) can still
        enter the kept set. Sums only decrease, so the most optimistic future score is the current
        sum spread over the longest possible length (penalty > 0) or the shortest (penalty <= 0)."""
        if len(self.items) < self.size:
            return False
        if early:
            return True
        length = max_new_tokens if self.length_penalty > 0 else generated + 1
        return self.items[-1].score >= best_running / (length**self.length_penalty)


@torch.inference_mode()
def beam_search(model: CausalLM, prompt_ids: Sequence[int], params: BeamSearchParams) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses for one prompt, best first."""
    cfg = model.config
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise SamplingParamsError("the prompt is empty: give at least one token (e.g. the bos token)")
    if len(prompt) + params.max_new_tokens > cfg.max_seq_len:
        raise SamplingParamsError(
            f"beam_search.max_new_tokens={params.max_new_tokens} plus the prompt's {len(prompt)} tokens "
            f"exceeds the context of {cfg.max_seq_len} tokens"
        )
    stop = set(params.stop_token_ids)
    if cfg.eos_token_id is not None and not params.ignore_eos:
        stop.add(cfg.eos_token_id)

    beams, groups = params.num_beams, params.num_beam_groups
    size = beams // groups
    device = next(model.parameters()).device
    cache = KVCache.for_model(model, beams, len(prompt) + params.max_new_tokens)
    first = cache.rows(0, 1)
    first.active_len = len(prompt)
    logits = model(
        torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device), first, last_only=True
    )[:, -1]
    cache.copy_row(0, list(range(1, beams)), len(prompt))
    logits = logits.expand(beams, -1)

    tokens: list[list[int]] = [[] for _ in range(beams)]
    sums = torch.zeros(beams, device=device)
    sums.view(groups, size)[:, 1:] = -math.inf  # identical rows at first: each group starts from one beam
    kept = [_Kept(size, params.length_penalty) for _ in range(groups)]
    done = [False] * groups

    for step in range(params.max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (beams, V)
        vocab = logprobs.shape[-1]
        origin = list(range(beams))
        next_tokens = [0] * beams
        chosen_now = torch.zeros(vocab, device=device)  # tokens picked by earlier groups this step
        new_tokens, new_sums = [list(t) for t in tokens], sums.clone()
        for g in range(groups):
            if done[g]:
                continue
            rows = slice(g * size, (g + 1) * size)
            candidates = sums[rows].unsqueeze(1) + logprobs[rows]  # (size, V) true log-prob sums
            ranking = candidates - params.diversity_penalty * chosen_now if g > 0 else candidates
            top = torch.topk(ranking.flatten(), min(2 * size, ranking.numel())).indices.tolist()
            filled = 0
            for rank, flat in enumerate(top):
                beam, token = divmod(flat, vocab)
                row = g * size + beam
                total = float(candidates[beam, token])
                if total == -math.inf:
                    break
                if token in stop:
                    if rank < size:  # a stop token only counts if it would have been a kept beam
                        kept[g].add(tokens[row] + [token], total, finished=True)
                    continue
                target = g * size + filled
                origin[target], next_tokens[target] = row, token
                new_tokens[target], new_sums[target] = tokens[row] + [token], total
                chosen_now[token] += 1
                filled += 1
                if filled == size:
                    break
            for target in range(g * size + filled, (g + 1) * size):  # too few live candidates
                new_sums[target] = -math.inf
            best = float(new_sums[rows].max())
            if best == -math.inf:
                done[g] = True
            elif step + 1 < params.max_new_tokens:  # after the last step the running beams compete below
                done[g] = kept[g].is_done(best, step + 1, params.max_new_tokens, params.early_stopping)
        tokens, sums = new_tokens, new_sums
        if all(done) or step + 1 == params.max_new_tokens:
            break
        written = len(prompt) + step  # prompt + the tokens fed so far occupy these positions
        cache.select_rows(torch.tensor(origin, device=device), written)
        cache.active_len = written + 1
        ids = torch.tensor(next_tokens, device=device).unsqueeze(1)
        logits = model(ids, torch.tensor([written], device=device), cache)[:, -1]

    for g in range(groups):  # beams still running when the budget ran out compete as they are
        if not done[g]:
            for row in range(g * size, (g + 1) * size):
                if sums[row] > -math.inf:
                    kept[g].add(tokens[row], float(sums[row]), finished=False)
    results = sorted((h for k in kept for h in k.items), key=lambda h: h.score, reverse=True)
    return results[: params.num_return_sequences]
