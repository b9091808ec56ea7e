"""One loaded model version: weights + tokenizer + a running continuous-batching engine.

`ModelRunner.generate(request)` is the text-level request path shared by the Ray replica and the
in-process server: text/messages -> token ids (chat template; special tokens as the model's tokenizer
adds them) -> checks against the context -> `EngineDriver.submit` (one engine request per choice) ->
token events -> text deltas (`TextDecoder.feed` from serving/textgen.py: incremental detokenization,
stop strings) -> the plain dict events described in serving/protocol.py.

Every way a request can be wrong becomes an `error` event with a 4xx status before it reaches the
engine; a full engine queue becomes 503 + Retry-After. When the consumer stops listening (client
disconnect, stop string reached by every choice) the engine request is cancelled at once, which
frees its slots and KV-cache rows for the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.model.checkpoint import dtype_from_name, load_model_dir
from lmforge.model.engine import Engine, EngineDriver, QueueFull
from lmforge.model.generation import SamplingParams, SamplingParamsError
from lmforge.model.quantized import share_tied_embedding
from lmforge.serving.chat import ChatTemplate
from lmforge.serving.config import EngineConfig
from lmforge.serving.protocol import APIError, GenerationRequest, bad_request
from lmforge.serving.textgen import TextDecoder, encode_prompt, eos_token_ids, model_tokenizer

log = logging.getLogger("lmforge.serving")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name)


# ---- token text and bytes (for logprobs) ---------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """The inverse of the GPT-2 byte-to-unicode table that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Text and raw bytes of single tokens, as OpenAI logprobs report them (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder") or {})
        self.byte_decoder = _byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            if token_id in self.added:
                raw = self.added[token_id].encode("utf-8")
            else:
                piece = self.tokenizer.id_to_token(token_id) or ""
                if self.byte_level and all(c in self.byte_decoder for c in piece):
                    raw = bytes(self.byte_decoder[c] for c in piece)
                else:
                    raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]

    def entry(
        self, token_id: int, logprob: float | None, top: tuple[tuple[int, float], ...] = ()
    ) -> dict[str, Any]:
        text, raw = self.get(token_id)
        return {
            "token": text,
            "bytes": raw,
            "logprob": logprob,
            "top": [(self.get(t)[0], lp, self.get(t)[1]) for t, lp in top],
        }


# ---- the runner -------------------------------------------------------------------------------
@dataclass
class RunnerInfo:
    label: str  # e.g. "bot/3" (registry) or the directory name
    source: str  # what was asked for: a directory or models:/NAME@ALIAS
    model_dir: str
    max_model_len: int
    num_slots: int
    vocab_size: int
    device: str
    dtype: str
    loaded_at: float


class ModelRunner:
    """A model version with its engine; requests hold it (acquire/release) so a hot swap can retire
    it only once the last in-flight request has finished."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        cfg: EngineConfig,
        *,
        label: str,
        source: str,
        model_dir: str,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        replica: str = "local",
    ) -> None:
        self.model, self.tokenizer, self.replica = model, tokenizer, replica
        self.engine = Engine(
            model,
            num_slots=cfg.num_slots,
            max_len=cfg.max_model_len,
            max_queue=cfg.max_queue,
            compile=cfg.compile,
        )
        self.driver = EngineDriver(self.engine).start()
        self.texts = TokenTexts(tokenizer)
        mcfg = model.config
        self.bos_id = mcfg.bos_token_id
        # the model's eos is added by the engine; a model config without one stops at the tokenizer's
        self.extra_stop_ids = () if mcfg.eos_token_id is not None else eos_token_ids(tokenizer, None)
        self.chat = ChatTemplate(chat_template, bos_token, eos_token) if chat_template else None
        self.chat_stop_ids = tuple(self.chat.turn_end_ids(tokenizer)) if self.chat else ()
        param = next(model.parameters())
        self.info = RunnerInfo(
            label,
            source,
            str(model_dir),
            self.engine.max_len,
            cfg.num_slots,
            mcfg.vocab_size,
            str(param.device),
            str(param.dtype).removeprefix("torch."),
            time.time(),
        )
        self._active = 0
        self._retired = False
        self.aborted = 0  # requests whose consumer left before the end (client disconnect)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        cfg: EngineConfig,
        *,
        label: str | None = None,
        source: str | None = None,
        replica: str = "local",
        model: torch.nn.Module | None = None,
    ) -> ModelRunner:
        """`model`: use these weights (e.g. a LoRA adapter merged in) with the directory's tokenizer and
        chat template, instead of loading the directory's weights."""
        model_dir = Path(model_dir)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if model is None:
            device = pick_device(cfg.device)
            model = load_model_dir(model_dir, device=device, dtype=pick_dtype(cfg.dtype, device))
            model = share_tied_embedding(model)  # quantized tied head: no second (fp32) embedding
        tokenizer = model_tokenizer(model_dir, model.config.vocab_size)
        tok_cfg_file = model_dir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_file.read_text(encoding="utf-8")) if tok_cfg_file.is_file() else {}
        template = tok_cfg.get("chat_template")
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # the multi-template form: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(
            model,
            tokenizer,
            cfg,
            label=label or model_dir.name,
            source=source or str(model_dir),
            model_dir=str(model_dir),
            chat_template=template,
            bos_token=_token_text(tok_cfg.get("bos_token")),
            eos_token=_token_text(tok_cfg.get("eos_token")),
            replica=replica,
        )

    # ---- lifetime -----------------------------------------------------------------------------
    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._active -= 1
            close = self._retired and self._active == 0
        if close:
            self._close()

    def retire(self) -> None:
        """Stop taking requests; the engine stops when the last in-flight request is done."""
        with self._lock:
            self._retired = True
            close = self._active == 0
        if close:
            self._close()

    def _close(self) -> None:
        threading.Thread(target=self.driver.stop, name="lmforge-engine-stop", daemon=True).start()
        log.info("model %s retired: engine stopped", self.info.label)

    @property
    def active(self) -> int:
        """Requests running on this version right now."""
        return self._active

    @property
    def healthy(self) -> bool:
        return self.driver._error is None

    def stats(self) -> dict[str, Any]:
        running, slots = self.engine.num_running, self.engine.num_slots
        return {
            "replica": self.replica,
            "model": self.info.label,
            "queue_depth": self.engine.num_waiting,
            "running": running,
            "num_slots": slots,
            "kv_cache_usage": running / slots,
            "aborted": self.aborted,
        }

    # ---- requests -----------------------------------------------------------------------------
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat:
            if self.chat is None:
                raise bad_request(
                    f"model {self.info.label} has no chat template (tokenizer_config.json "
                    "chat_template); use /v1/completions",
                    "messages",
                    "chat_template_missing",
                )
            rendered = self.chat.render(request.messages)  # the template writes its own special tokens
            return encode_prompt(self.tokenizer, rendered, self.bos_id, add_special_tokens=False)
        if isinstance(request.prompt, str):
            if not request.prompt and self.bos_id is None:
                raise bad_request("prompt: empty, and the model has no bos token to start from", "prompt")
            return encode_prompt(self.tokenizer, request.prompt, self.bos_id)
        ids = list(request.prompt or [])
        if not ids:
            raise bad_request("prompt: the token list is empty", "prompt")
        vocab = self.info.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(
                f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt"
            )
        return ids

    def sampling_params(self, request: GenerationRequest, prompt_len: int) -> SamplingParams:
        max_len = self.info.max_model_len
        where = "messages" if request.chat else "prompt"
        if prompt_len >= max_len:
            raise bad_request(
                f"{where}: {prompt_len} tokens leave no room to generate in this model's context of "
                f"{max_len} tokens",
                where,
                "context_length_exceeded",
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else max_len - prompt_len
        if prompt_len + max_tokens > max_len:
            raise bad_request(
                f"max_tokens: {max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's "
                f"context of {max_len} tokens; ask for at most {max_len - prompt_len}",
                "max_tokens",
                "context_length_exceeded",
            )
        stop_ids: tuple[int, ...] = ()
        if not request.sampling.get("ignore_eos"):
            stop_ids = tuple(
                dict.fromkeys(self.extra_stop_ids + (self.chat_stop_ids if request.chat else ()))
            )
        try:
            return SamplingParams(
                max_new_tokens=max(max_tokens, 1),
                stop_token_ids=stop_ids,
                logprobs=request.logprobs,
                **request.sampling,
            )
        except SamplingParamsError as err:
            field = str(err).removeprefix("sampling.").split(" ", 1)[0]
            raise bad_request(str(err).removeprefix("sampling."), _API_NAMES.get(field, field)) from err

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """The request's events (see serving/protocol.py); errors are events, never exceptions."""
        try:
            ids = self.prompt_ids(request)
            params = self.sampling_params(request, len(ids))
        except APIError as err:
            yield err.event()
            return
        start: dict[str, Any] = {"type": "start", "prompt_tokens": len(ids), "model": self.info.label}
        if request.echo:
            start["prompt_text"] = (
                self.tokenizer.decode(ids, skip_special_tokens=False)
                if not isinstance(request.prompt, str)
                else request.prompt
            )
            if request.logprobs is not None:
                start["prompt_logprobs"] = await asyncio.to_thread(
                    self.prompt_logprobs, ids, request.logprobs
                )
        if request.max_tokens == 0:  # echo-only scoring request: nothing to generate
            start["stats"] = self.stats()
            yield start
            for i in range(params.n):
                yield {"type": "finish", "index": i, "reason": "length", "completion_tokens": 0}
            yield {"type": "end", "stats": self.stats()}
            return
        if params.n > self.info.num_slots:
            yield bad_request(
                f"n: at most {self.info.num_slots} choices per prompt on this server "
                f"(engine.num_slots), got {params.n}",
                "n",
            ).event()
            return
        try:  # one engine request for all n choices: they share the prompt's prefill
            stream = self.driver.submit(ids, params, request_id=request.request_id)
        except QueueFull as err:
            yield APIError(
                503,
                f"the server is busy: {err}",
                "overloaded_error",
                None,
                "queue_full",
                {"Retry-After": "1"},
            ).event()
            return
        except (ValueError, RuntimeError) as err:  # duplicate id; RuntimeError: the engine failed
            status = 400 if isinstance(err, ValueError) else 503
            yield APIError(
                status, str(err), "invalid_request_error" if status == 400 else "overloaded_error"
            ).event()
            return
        start["stats"] = self.stats()
        yield start
        async for event in self._events(stream, request, ids, params):
            yield event
        yield {"type": "end", "stats": self.stats()}

    async def _events(self, stream, request: GenerationRequest, ids: list[int], params: SamplingParams):
        decoders = [TextDecoder(self.tokenizer, ids, request.stop) for _ in range(params.n)]
        open_choices = set(range(params.n))
        engine_done: set[int] = set()  # choices the engine itself has finished
        want_logprobs = request.logprobs is not None
        try:
            async for ev in stream:
                i = ev.index
                if ev.finish_reason is not None:
                    engine_done.add(i)
                if i not in open_choices:
                    continue  # a choice already ended by a stop string; the engine has not noticed yet
                tokens, logprobs = [], []
                if ev.token_id is not None:
                    tokens.append(ev.token_id)
                    if want_logprobs and ev.logprob is not None:
                        logprobs.append(self.texts.entry(ev.token_id, ev.logprob.logprob, ev.logprob.top))
                text = decoders[i].feed(ev)
                reason = decoders[i].finish_reason
                if text or tokens:
                    delta = {"type": "delta", "index": i, "text": text, "token_ids": tokens}
                    if want_logprobs:
                        delta["logprobs"] = logprobs
                    yield delta
                if reason is not None:
                    open_choices.discard(i)
                    yield {
                        "type": "finish",
                        "index": i,
                        "reason": reason,
                        "completion_tokens": len(decoders[i].token_ids),
                    }
                    if not open_choices:
                        break
        finally:
            if len(engine_done) < params.n:
                stream.cancel()  # client gone or every choice stopped early: free the slots now
                if open_choices:
                    self.aborted += 1

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[str, Any] | None]:
        """Log-probability of each prompt token given the ones before it (None for the first), with
        the k most likely alternatives: what `echo` + `logprobs` report for the prompt."""
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor([ids], dtype=torch.long, device=device))[0].float()  # (T, V)
        logprobs = logits.log_softmax(dim=-1)
        out: list[dict[str, Any] | None] = [self.texts.entry(ids[0], None)]
        target = torch.tensor(ids[1:], dtype=torch.long, device=device)
        chosen = logprobs[:-1].gather(-1, target.unsqueeze(-1)).squeeze(-1).tolist()
        top_vals, top_ids = torch.topk(logprobs[:-1], k, dim=-1) if k > 0 else (None, None)
        for t in range(1, len(ids)):
            top = tuple(zip(top_ids[t - 1].tolist(), top_vals[t - 1].tolist(), strict=True)) if k > 0 else ()
            out.append(self.texts.entry(ids[t], chosen[t - 1], top))
        return out


_API_NAMES = {"max_new_tokens": "max_tokens", "stop_token_ids": "stop"}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
