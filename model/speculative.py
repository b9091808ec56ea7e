"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one pass.

Each round the draft proposes k tokens one by one (cheap), then the target runs ONE forward over
the last accepted token + the k proposals, giving its own distribution at each of the k + 1
positions. Proposals are accepted left to right with the standard rule (Leviathan et al. 2023;
Chen et al. 2023): accept draft token x with probability min(1, p(x) / q(x)), where p and q are
the target's and the draft's distributions after the same temperature / top-k / top-p / min-p;
at the first rejection, sample instead from the residual max(0, p - q) renormalised; if all k are
accepted, sample a bonus token from p. The emitted tokens are then distributed exactly as sampling
from the target alone. With temperature 0 both distributions are one-hot, so the rule reduces to
"accept while the draft's token is the target's argmax" and the output equals greedy decoding of
the target (tested).

Rejected proposals need no cache rollback: every cache entry lives at its token position and the
causal mask built from positions never shows a query the stale entries beyond it; they are simply
overwritten later. Batch size 1, no penalties, constraints or logprobs (use `generate` for those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmforge.model.config import ConfigError
from lmforge.model.generation import SamplingParams, SamplingParamsError, new_generator, warp_logits
from lmforge.model.kv_cache import KVCache

if TYPE_CHECKING:
    from lmforge.model.transformer import CausalLM


@dataclass(frozen=True)
class SpeculativeOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    proposed: int  # draft tokens proposed
    accepted: int  # draft tokens the target accepted
    target_forwards: int  # target passes after the prefill (plain decoding needs one per token)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def accept_or_resample(
    p: torch.Tensor,  # (N, V) target probabilities
    q: torch.Tensor,  # (N, V) draft probabilities the proposals were drawn from
    proposals: torch.Tensor,  # (N,) draft tokens
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject rule for N independent proposals: (accepted (N,) bool, token (N,)), where
    token is the proposal if accepted, else a sample from the residual max(0, p - q)."""
    rows = torch.arange(p.shape[0], device=p.device)
    p_x, q_x = p[rows, proposals], q[rows, proposals]
    u = torch.rand(p.shape[0], generator=generator, device=p.device)
    accepted = u * q_x < p_x  # u < p/q without dividing by a zero q
    residual = (p - q).clamp_min(0)
    empty = residual.sum(-1, keepdim=True) <= 0  # p == q: the residual is empty, p itself is right
    residual = torch.where(empty, p, residual)
    resampled = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator).squeeze(
        -1
    )
    return accepted, torch.where(accepted, proposals, resampled)


def _check(target: CausalLM, draft: CausalLM, prompt: list[int], params: SamplingParams, k: int) -> None:
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); speculative decoding needs the same tokenizer"
        )
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
    unsupported = [
        name
        for name, on in (
            ("n > 1", params.n > 1),
            ("penalties", params.penalized),
            ("logprobs", params.logprobs is not None),
        )
        if on
    ]
    if unsupported:
        raise SamplingParamsError(
            f"speculative decoding does not support {', '.join(unsupported)}; use generate()"
        )
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    params.check_request(len(prompt), context, target.config.vocab_size)


@torch.inference_mode()
def speculative_generate(
    target: CausalLM,
    draft: CausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    num_draft_tokens: int = 4,
) -> SpeculativeOutput:
    params = params or SamplingParams()
    tokens = [int(t) for t in prompt_ids]
    _check(target, draft, tokens, params, num_draft_tokens)
    device = next(target.parameters()).device
    stop = set(params.stop_token_ids)
    if target.config.eos_token_id is not None and not params.ignore_eos:
        stop.add(target.config.eos_token_id)
    generator = None if params.greedy else new_generator(params.seed, device)
    max_len = len(tokens) + params.max_new_tokens
    caches = {"target": KVCache.for_model(target, 1, max_len), "draft": KVCache.for_model(draft, 1, max_len)}
    cached = {"target": 0, "draft": 0}  # tokens whose keys/values each cache holds (all but the last)

    def feed(name: str, model: CausalLM, new: list[int]) -> torch.Tensor:
        """Run `new` tokens from position cached[name]; return their next-token logits (T, V)."""
        start, cache = cached[name], caches[name]
        cache.active_len = start + len(new)
        ids = torch.tensor([new], device=device)
        logits = model(ids, torch.arange(start, start + len(new), device=device), cache)[0].float()
        cached[name] = start + len(new)
        return logits

    def distribution(logits: torch.Tensor) -> torch.Tensor:
        if params.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return warp_logits(logits, params).softmax(-1)

    prompt_len = len(tokens)
    if prompt_len > 1:  # both caches hold everything but the last token, which each round feeds
        feed("target", target, tokens[:-1])
        feed("draft", draft, tokens[:-1])
    proposed = accepted_total = forwards = 0
    finish = "length"
    while len(tokens) - prompt_len < params.max_new_tokens:
        remaining = params.max_new_tokens - (len(tokens) - prompt_len)
        k = min(num_draft_tokens, remaining - 1)  # k proposals + 1 target token never overshoot
        # 1. the draft proposes k tokens (after catching up on tokens it has not seen yet)
        draft_start = len(tokens)
        drafts, q = [], []
        logits = feed("draft", draft, tokens[cached["draft"] :])[-1]
        for i in range(k):
            q_i = distribution(logits)
            x = int(q_i.argmax()) if params.greedy else int(torch.multinomial(q_i, 1, generator=generator))
            drafts.append(x)
            q.append(q_i)
            if i + 1 < k:
                logits = feed("draft", draft, [x])[-1]
        # 2. the target scores the last token + all proposals in one pass
        p = distribution(feed("target", target, [tokens[-1], *drafts]))  # (k + 1, V)
        forwards += 1
        # 3. accept left to right; the first rejection is replaced by a residual sample
        emitted = []
        for i, x in enumerate(drafts):
            if params.greedy:
                ok, token = x == int(p[i].argmax()), int(p[i].argmax())
            else:
                ok_t, token_t = accept_or_resample(
                    p[i : i + 1], q[i].unsqueeze(0), torch.tensor([x], device=device), generator
                )
                ok, token = bool(ok_t), int(token_t)
            emitted.append(token)
            if not ok:
                break
        else:  # every proposal accepted: a bonus token from the target's last distribution
            bonus = (
                int(p[k].argmax()) if params.greedy else int(torch.multinomial(p[k], 1, generator=generator))
            )
            emitted.append(bonus)
        n_accepted = len(emitted) - 1
        proposed += k
        accepted_total += n_accepted
        cached["target"] = len(tokens) + n_accepted  # entries beyond are stale proposals
        cached["draft"] = min(cached["draft"], draft_start + n_accepted)
        for token in emitted:
            tokens.append(token)
            if token in stop:
                finish = "stop"
                break
        if finish == "stop":
            break
    return SpeculativeOutput(tokens[prompt_len:], finish, proposed, accepted_total, forwards)
