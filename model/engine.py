"""Continuous-batching generation engine: requests join and leave a running batch at any step.

Memory is bounded up front: one preallocated KV cache of `num_slots` rows x `max_len` positions.
A sequence owns one row (a slot) from admission until it finishes or is cancelled, then the row is
reused at once by the next waiting request. Requests wait in a FIFO queue of at most `max_queue`;
beyond that `submit` raises `QueueFull` instead of letting memory grow without bound.

Each `step()`:
  1. applies cancellations and admits waiting requests into free slots (a request with `n`
     samples takes n slots; the lowest free slots are used so busy rows stay packed at the top),
  2. prefills each admitted prompt in its first slot with a batch of one (the same computation as
     running the request alone), copies that prompt cache into its other samples' slots, and picks
     each sample's first token,
  3. decodes one token for every running sequence in ONE batched forward over rows
     [0, highest busy slot]; each row sits at its own position, and the causal mask built from the
     positions keeps rows from seeing stale keys of earlier occupants,
  4. finishes sequences (stop token, max tokens, cancelled) and frees their slots.
So a request's greedy output does not depend on what else is running (tested in fp32).

Threads: `submit` and `cancel` may be called from any thread, `step` from one thread at a time.
`EngineDriver` runs `step()` in a background thread and routes each request's events to its own
`RequestStream`, iterable both synchronously and with `async for` (what a Ray Serve replica needs).

    engine = Engine(model, num_slots=8)
    rid = engine.submit(prompt_ids, SamplingParams(max_new_tokens=16, temperature=0))
    while engine.has_work():
        for event in engine.step(): ...
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmforge.model.config import ConfigError
from lmforge.model.constrained import TokenConstraint
from lmforge.model.generation import SamplingParams, TokenChooser, TokenEvent, TokenLogprob
from lmforge.model.kv_cache import KVCache

if TYPE_CHECKING:
    from lmforge.model.transformer import CausalLM


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: retry later (an HTTP server answers 429/503)."""


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    sequences: list[_Sequence] = field(default_factory=list)


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int
    chooser: TokenChooser
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Where the last token will be written when it is fed back (prompt occupies 0..L-1)."""
        return len(self.request.prompt_ids) + len(self.tokens) - 1


class Engine:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_slots: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        compile: bool = False,
    ) -> None:
        """`max_len` bounds prompt + new tokens of every request (default: the model's context).
        `compile=True` decodes with static shapes (all slots, full cache) through torch.compile, and
        CUDA graphs on a GPU: slower to start (tens of seconds), faster per token where per-op
        overhead dominates (small models, GPUs). With one slot on a CPU it also lays the model's
        fp32 weights out row-major (`apply_decode_layout(model, for_compile=True)`), in place."""
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ConfigError(f"engine.num_slots must be an integer >= 1, got {num_slots!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"engine.max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = model
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = cfg.eos_token_id
        self.cache = KVCache.for_model(model, num_slots, max_len)  # validates max_len <= context
        self.max_len = self.cache.max_len
        self.num_slots = num_slots
        self.max_queue = max_queue
        self.device = self.cache.k.device
        self._slots: list[_Sequence | None] = [None] * num_slots
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}  # waiting or running
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._views: dict[tuple[int, int], KVCache] = {}
        self._compiled_warm = False
        self._compiled = self._compile_decode() if compile else None

    # ---- public API ---------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        constraint: TokenConstraint | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises QueueFull, or ValueError for a request that can
        never run (too long for max_len, n larger than the slots, token ids outside the vocabulary)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        params.check_request(len(prompt), self.max_len, self.vocab_size)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if params.n > self.num_slots:
            raise ValueError(f"sampling.n={params.n} exceeds the engine's {self.num_slots} slots")
        stop = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop.add(self.eos_token_id)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the generation queue is full ({self.max_queue} requests waiting, "
                    f"{self.num_slots} slots busy); retry later"
                )
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            request = _Request(rid, prompt, params, frozenset(stop))
            request.sequences = [
                _Sequence(
                    request, i, TokenChooser(params, prompt, self.vocab_size, self.device, i, constraint)
                )
                for i in range(params.n)
            ]
            self._waiting.append(request)
            self._requests[rid] = request
        return rid

    def cancel(self, request_id: str) -> bool:
        """Stop a waiting or running request at the next step (its slots are freed then, and each
        unfinished sample gets a final event with finish_reason "cancelled"). False if unknown."""
        with self._lock:
            if request_id not in self._requests:
                return False
            self._cancelled.add(request_id)
            return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._cancelled or any(s is not None for s in self._slots))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self._slots)

    def step(self) -> list[TokenEvent]:
        """Admit, prefill, decode one token for every running sequence; return this step's events."""
        events: list[TokenEvent] = []
        with torch.inference_mode():
            with self._lock:
                self._apply_cancellations(events)
                admitted = self._admit()
            for request in admitted:
                self._prefill(request, events)
            self._decode(events)
        return events

    # ---- admission and slots ------------------------------------------------------------------
    def _apply_cancellations(self, events: list[TokenEvent]) -> None:
        for rid in self._cancelled:
            request = self._requests.pop(rid, None)
            if request is None:
                continue
            if request in self._waiting:
                self._waiting.remove(request)
            for seq in request.sequences:
                if seq.finish_reason is None:
                    self._finish(seq, "cancelled")
                    events.append(TokenEvent(rid, seq.index, None, None, "cancelled"))
        self._cancelled.clear()

    def _admit(self) -> list[_Request]:
        admitted = []
        free = [i for i, s in enumerate(self._slots) if s is None]
        while self._waiting and len(free) >= self._waiting[0].params.n:
            request = self._waiting.popleft()
            for seq in request.sequences:
                seq.slot = free.pop(0)
                self._slots[seq.slot] = seq
            admitted.append(request)
        return admitted

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.slot >= 0 and self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        request = seq.request
        if all(s.finish_reason is not None for s in request.sequences):
            self._requests.pop(request.request_id, None)

    def _view(self, start: int, stop: int) -> KVCache:
        key = (start, stop)
        if key not in self._views:
            self._views[key] = self.cache.rows(start, stop)
        return self._views[key]

    # ---- model calls --------------------------------------------------------------------------
    def _prefill(self, request: _Request, events: list[TokenEvent]) -> None:
        n = len(request.prompt_ids)
        first = request.sequences[0].slot
        view = self._view(first, first + 1)
        view.active_len = n
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model(ids, torch.arange(n, device=self.device), view, last_only=True)[0, -1]  # (V,)
        self.cache.copy_row(first, [s.slot for s in request.sequences[1:]], n)
        for seq in request.sequences:
            self._advance(seq, seq.chooser.choose(logits, seq.tokens), events)

    def _decode(self, events: list[TokenEvent]) -> None:
        live = [s for s in self._slots if s is not None]
        if not live:
            return
        logits = self._forward_decode(live)  # (rows, V), row = slot
        if all(s.chooser.plain_greedy for s in live):
            chosen = logits.argmax(dim=-1).tolist()  # one batched argmax: the common fast path
            for seq in live:
                self._advance(seq, TokenLogprob(chosen[seq.slot], math.nan), events)
        else:
            for seq in live:
                self._advance(seq, seq.chooser.choose(logits[seq.slot], seq.tokens), events)

    def _forward_decode(self, live: list[_Sequence]) -> torch.Tensor:
        rows = self.num_slots if self._compiled is not None else max(s.slot for s in live) + 1
        tokens, positions = [0] * rows, [0] * rows  # free rows decode a dummy token into their own row
        for seq in live:
            tokens[seq.slot], positions[seq.slot] = seq.tokens[-1], seq.position
        token_ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # (rows, 1)
        if self._compiled is not None:
            pos = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            if not self._compiled_warm:  # the first call compiles, with every guard checked
                logits = self._compiled(token_ids, pos)
                self._compiled_warm = True
                return logits
            # Later calls have the same shapes, dtypes, model and cache by construction, so Dynamo's
            # per-call guard evaluation (~0.7 ms on CPU, a tenth of a small model's decode step) is
            # reduced to the guards that tell compiled graphs apart (there is one).
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._compiled(token_ids, pos)
        view = self._view(0, rows)
        view.active_len = max(positions) + 1
        if len(live) == rows and len(set(positions)) == 1:
            pos = torch.tensor(positions[:1], dtype=torch.long, device=self.device)  # shared (T,) positions
        else:
            pos = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)  # (rows, 1)
        return self.model(token_ids, pos, view)[:, -1]

    def _compile_decode(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A static-shape decode step (every slot, the full cache) for torch.compile / CUDA graphs."""
        cache, model = self.cache, self.model
        cache.active_len = self.max_len
        for buffer in (cache.k, cache.v):
            torch._dynamo.mark_static_address(buffer)

        def decode(token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model(token_ids, positions, cache)[:, -1]

        if self.device.type == "cuda":  # CUDA graphs: one launch per step instead of hundreds
            return torch.compile(decode, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # CPU: inductor fuses the element-wise ops between the matmuls, and its C++ wrapper calls the
        # kernels without a Python hop each. With one slot every projection is a matrix-vector
        # product, which the fused reduction of decode_layout streams faster than any GEMV layout.
        # (The isinstance check is for mypy: a CausalLM need not be a module, though every model is one.)
        if self.num_slots == 1 and isinstance(model, torch.nn.Module):
            from lmforge.model.decode_layout import apply_decode_layout

            apply_decode_layout(model, for_compile=True)
        return torch.compile(decode, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})

    def _advance(self, seq: _Sequence, choice: TokenLogprob | None, events: list[TokenEvent]) -> None:
        """Record a sequence's new token (or its end, when its constraint allows nothing more)."""
        rid = seq.request.request_id
        if choice is None:
            self._finish(seq, "stop")
            events.append(TokenEvent(rid, seq.index, None, None, "stop"))
            return
        token = choice.token_id
        seq.tokens.append(token)
        reason = None
        if token in seq.request.stop_ids:
            reason = "stop"
        elif len(seq.tokens) >= seq.request.params.max_new_tokens or seq.position + 1 >= self.max_len:
            reason = "length"
        logprob = choice if seq.request.params.logprobs is not None else None
        events.append(TokenEvent(rid, seq.index, token, logprob, reason))
        if reason is not None:
            self._finish(seq, reason)


# ---- background driver ------------------------------------------------------------------------
class RequestStream:
    """The events of one request, in order, ending when every sample has finished.

    Iterate it with `for` (blocking) or `async for` (never blocks the event loop)."""

    def __init__(self, driver: EngineDriver, request_id: str, n: int) -> None:
        self.request_id = request_id
        self._driver = driver
        self._remaining = n  # samples not yet finished, as seen by the consumer
        self._open_samples = n  # samples not yet finished, as seen by the driver thread
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None

    def cancel(self) -> bool:
        return self._driver.cancel(self.request_id)

    def _deliver(self, item: TokenEvent | BaseException) -> None:
        self._queue.put(item)
        loop, ready = self._loop, self._ready  # _ready is set before _loop (see __aiter__)
        if loop is not None and ready is not None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting
                pass

    def _take(self, item: TokenEvent | BaseException) -> TokenEvent:
        if isinstance(item, BaseException):
            self._remaining = 0
            raise RuntimeError(f"generation engine failed: {item}") from item
        if item.finish_reason is not None:
            self._remaining -= 1
        return item

    def __iter__(self) -> Iterator[TokenEvent]:
        while self._remaining > 0:
            yield self._take(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        self._ready = asyncio.Event()  # set before _loop: the driver thread checks _loop first
        self._loop = asyncio.get_running_loop()
        while self._remaining > 0:
            self._ready.clear()  # clear before looking, so a delivery in between is not missed
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                await self._ready.wait()
                continue
            yield self._take(item)


class EngineDriver:
    """Runs `engine.step()` in a background thread while there is work, sleeping otherwise."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> EngineDriver:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> EngineDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        constraint: TokenConstraint | None = None,
    ) -> RequestStream:
        """Queue a request (QueueFull / ValueError as Engine.submit) and return its event stream."""
        params = params or SamplingParams()
        if self._error is not None:
            raise RuntimeError(f"the generation engine stopped after an error: {self._error!r}")
        with self._streams_lock:  # registered before the engine can produce its first event
            rid = self.engine.submit(prompt_ids, params, request_id=request_id, constraint=constraint)
            stream = self._streams[rid] = RequestStream(self, rid, params.n)
        self._wakeup.set()
        return stream

    def cancel(self, request_id: str) -> bool:
        found = self.engine.cancel(request_id)
        self._wakeup.set()
        return found

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            if not self.engine.has_work():
                self._wakeup.wait(timeout=1.0)
                continue
            try:
                events = self.engine.step()
            except BaseException as err:  # a bug or OOM: fail every open stream instead of hanging it
                self._error = err
                with self._streams_lock:
                    streams, self._streams = list(self._streams.values()), {}
                for failed in streams:
                    failed._deliver(err)
                return  # the engine's state is unknown now; later submits are refused with the error
            with self._streams_lock:
                for event in events:
                    stream = self._streams.get(event.request_id)
                    if stream is None:
                        continue
                    stream._deliver(event)
                    if event.finish_reason is not None:
                        # route until the LAST of the request's n samples has finished: samples
                        # finishing in the same step all arrive in this batch of events
                        stream._open_samples -= 1
                        if stream._open_samples == 0:
                            self._streams.pop(event.request_id, None)
