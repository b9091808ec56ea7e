"""lmforge models inside lm-evaluation-harness: an `lm_eval.api.model.LM` that runs harness tasks.

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lmforge.components.evaluate.harness import LmforgeLM

    lm = LmforgeLM("out/model", batch_size=8)            # a model directory (or model=, tokenizer=)
    res = lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                                  task_manager=TaskManager(include_path="my_tasks/"))
    res["results"]["my_task"]["acc,none"]

The harness asks for three things; each reuses the code `lmforge evaluate` scores with, so a
number means the same in both tools:
- `loglikelihood` (multiple choice, cloze): context/continuation ids split as the harness does
  (`scoring.continuation_pairs`), scored in batches by `lmforge.model.generation.score_batch`,
  which also says whether the continuation is the greedy one;
- `loglikelihood_rolling` (perplexity tasks): every token of the text, the first after the bos
  (else eos) token, with disjoint context-sized windows (`scoring.document_nlls`);
- `generate_until`: the continuous-batching engine with the harness's stop strings
  (`scoring.generate_texts`), greedy unless the task asks for sampling.

Needs the optional `lm-eval` package (`pip install lmforge[eval-harness]`; it is in `dev`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM

from lmforge.components.evaluate.scoring import continuation_pairs, document_nlls, generate_texts
from lmforge.components.evaluate.tasks import start_token
from lmforge.model.generation import SamplingParams, score_batch
from lmforge.serving.textgen import eos_token_ids


class LmforgeLM(LM):
    """An lmforge model (a model directory, or a model and tokenizer already in memory) for
    `lm_eval.simple_evaluate`. Requests are answered in the order given, in batches of `batch_size`."""

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer=None,  # a tokenizers.Tokenizer; with a directory, the directory's own
        batch_size: int = 8,
        device: str = "cpu",
        seed: int = 0,  # for tasks that sample (temperature > 0)
    ) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            from lmforge.model.checkpoint import load_model_dir
            from lmforge.serving.textgen import model_tokenizer

            loaded = load_model_dir(model, device=device).eval()
            tokenizer = tokenizer or model_tokenizer(model, loaded.config.vocab_size)
            model = loaded
        elif tokenizer is None:
            raise ValueError("a model object needs its tokenizer (tokenizer=...)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.context_len = model.config.max_seq_len
        self.start = start_token(model, tokenizer)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ---- the three request types -----------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding would produce the continuation)."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            if context:
                pairs.append(continuation_pairs(self._encode, context, continuation, self.context_len))
            else:  # nothing to condition on: the start token stands in, as in the harness's HFLM
                pairs.append(([self.start], self._encode(continuation)[: self.context_len - 1]))
        scores = score_batch(self.model, pairs, batch_size=self.batch_size)
        out = [(s.logprob, s.is_greedy) for s in scores]
        for request, result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, every token scored (the first after the start token)."""
        sequences = [[self.start, *self._encode(request.args[0])] for request in requests]
        nlls = document_nlls(
            self.model, sequences, self.context_len, self.context_len, batch_size=self.batch_size
        )
        out = [-nll for nll, _ in nlls]
        for request, result in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string (`until`), eos or `max_gen_toks` tokens.
        Requests with the same generation settings run together on the engine."""
        groups: dict[tuple, list[int]] = {}
        settings = [self._settings(request.args[1]) for request in requests]
        for i, key in enumerate(settings):
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new, temperature), indices in groups.items():
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=temperature,
                seed=self.seed if temperature > 0 else None,
                stop_token_ids=eos_token_ids(self.tokenizer, self.model.config.eos_token_id),
            )
            keep = self.context_len - max_new  # the prompt is cut from the left to leave room
            prompts = [(self._encode(requests[i].args[0]) or [self.start])[-keep:] for i in indices]
            generated = generate_texts(self.model, self.tokenizer, prompts, params, until, self.batch_size)
            for i, g in zip(indices, generated, strict=True):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out

    def _settings(self, gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int, float]:
        """(stop strings, new tokens, temperature) from the harness's generation arguments."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        max_new = max(1, min(max_new, self.context_len - 1))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        return until, max_new, temperature
