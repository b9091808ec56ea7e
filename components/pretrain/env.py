"""Where a training process runs and how it talks to the world outside the loop.

The loop in `loop.py` is the same code in-process and on Ray Train workers; what differs is
collected here, behind one small class:
  - rank / world size / device, and the torch.distributed process group (Ray Train creates it on
    its workers; in-process runs create a one-process gloo group only when FSDP or DeepSpeed need
    one),
  - stop requests (SIGTERM or a first Ctrl-C: in-process a local flag; on Ray a flag the driver
    sets, see `trainer.py`),
  - where a checkpoint is staged and how it is published (in-process: an atomic rename inside
    `<output_dir>/checkpoints` and pruning to the last K; on Ray: `ray.train.report`, which merges
    every rank's files into one checkpoint directory in the run's storage and keeps the last K),
  - which checkpoint to start from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.components.pretrain import checkpointing


class RunEnv:
    """In-process environment: one process, world size 1, SIGTERM asks for a checkpoint and a stop."""

    def __init__(
        self,
        checkpoints_dir: str | os.PathLike,
        keep_last: int,
        resume_from: str | os.PathLike | None,
        use_gpu: bool = False,
    ) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = (
            torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        )
        self.checkpoints_dir = Path(checkpoints_dir)
        self.keep_last = keep_last
        self.resume_from = Path(resume_from) if resume_from else None
        self._stop = threading.Event()

    # ---- process group ----------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def ensure_process_group(self, backend: str) -> None:
        """FSDP and DeepSpeed need a process group even with one process: make a private one.

        It lives as long as the process and is reused by later runs in it: DeepSpeed caches
        its groups globally, so destroying and re-creating the group would break a second run."""
        if self.distributed:
            return
        with socket.socket() as s:  # a free local port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            timeout=timedelta(minutes=10),
        )

    # ---- stop requests ----------------------------------------------------------------------
    def stop_on_signals(self) -> contextlib.AbstractContextManager:
        """While training, SIGTERM (preemption) or a first Ctrl-C sets the stop flag instead of
        killing the process; the loop then writes a checkpoint and returns."""
        return graceful_stop(self.request_stop)

    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self, log_step: bool) -> bool:
        """Whether to checkpoint and stop after this step. Every rank calls it after every step
        and gets the same answer. In-process the flag is local and checked every step; on Ray it
        is polled only on log steps (`RayEnv`), where the ranks agree through one all-reduce."""
        return self._stop.is_set()

    # ---- checkpoints ------------------------------------------------------------------------
    def start_checkpoint(self) -> Path | None:
        """The checkpoint to restore at startup: an explicit/auto resume path, or nothing."""
        return self.resume_from

    def staging_dir(self, step: int) -> Path:
        """An empty directory this rank writes its part of the step's checkpoint into."""
        path = self.checkpoints_dir / f".tmp-{checkpointing.checkpoint_name(step)}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def publish_checkpoint(self, staged: Path, step: int, metrics: dict[str, Any]) -> Path:
        """Atomically move the staged checkpoint into place, then keep only the last K."""
        final = self.checkpoints_dir / checkpointing.checkpoint_name(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        checkpointing.prune(self.checkpoints_dir, self.keep_last)
        return final


@contextlib.contextmanager
def graceful_stop(request: Callable[[], None]) -> Iterator[None]:
    """Within the block, SIGTERM and a first Ctrl-C call `request()` (checkpoint and stop); a
    second Ctrl-C raises KeyboardInterrupt at once. Only the main thread may install handlers, so
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_term = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)

    def on_term(signum, frame) -> None:
        request()

    def on_int(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts
        print(
            "[pretrain] Ctrl-C: checkpointing and stopping (press Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )
        request()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
