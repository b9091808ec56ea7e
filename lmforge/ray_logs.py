"""Ray's console output for the commands that start Ray (`lmforge pretrain`, `lmforge serve`).

Left alone, Ray prints its own driver logs and every worker's stdout and stderr on the driver's
console, each line prefixed `(ActorName pid=N)`: placement-group cleaners, controllers, checkpoint
notices, request logs, a hundred lines around the few a user wants. `RayLogs` sends all of it to
one log file, and lets through to the console only the worker lines a command names as its own
(pretraining progress, lmforge warnings); `verbose=True` keeps Ray's console output as well.

    logs = RayLogs(out / "ray.log", verbose=False, show=lambda line: line.startswith("[pretrain] "))
    with logs:                     # Ray's loggers and worker output -> the file (+ `show` lines)
        ray.init(log_to_driver=True, ...)
        logs.ray_started()         # and the loggers ray.init configured
        ...

Worker output is taken where Ray prints it (`ray._private.worker.print_to_stdstream`); on a Ray
without that function it stays on the console as before, so nothing is ever lost.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.tracking import DEFAULT_HOME

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Drop(logging.Filter):
    """Attached to Ray's console handlers while output goes to the file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


class RayLogs:
    """Route Ray's driver logs and its workers' output to `path` (appended), and to the console
    only what `show(line)` accepts, unless `verbose`."""

    def __init__(
        self, path: str | os.PathLike, *, verbose: bool = False, show: Callable[[str], bool] | None = None
    ) -> None:
        self.path = Path(path)
        self.verbose = verbose
        self.show = show or (lambda line: False)
        self._file: logging.FileHandler | None = None
        self._silenced: list[logging.Handler] = []
        self._with_file: list[logging.Logger] = []
        self._drop = _Drop()
        self._worker_module: Any = None
        self._ray_printer: Callable | None = None

    # ---- driver-side loggers ------------------------------------------------------------------
    def __enter__(self) -> RayLogs:
        import ray  # noqa: F401  (configures the "ray" logger this routes)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:  # one header line per command
            f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        self._file = logging.FileHandler(self.path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(_FORMAT))
        self._route_ray_loggers()
        self._patch_printer()
        return self

    def _route_ray_loggers(self) -> None:
        """Every `ray*` logger that prints to the console also writes to the file, and (quiet mode)
        stops printing. Called again after ray.init / serve.start, which configure more loggers."""
        assert self._file is not None
        names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
        for logger in (logging.getLogger(n) for n in names):
            console = [h for h in logger.handlers if _is_console(h)]
            if not console:
                continue
            if not self.verbose:
                for handler in console:
                    if self._drop not in handler.filters:
                        handler.addFilter(self._drop)
                        self._silenced.append(handler)
            if logger not in self._with_file and not self._file_reaches(logger):
                logger.addHandler(self._file)
                self._with_file.append(logger)

    def _file_reaches(self, logger: logging.Logger) -> bool:
        current: logging.Logger | None = logger
        while current is not None:
            if self._file in current.handlers:
                return True
            current = current.parent if current.propagate else None
        return False

    # ---- worker output ------------------------------------------------------------------------
    def ray_started(self) -> None:
        """Call right after ray.init: routes the loggers it configured (the worker output hook is
        in place from `__enter__`)."""
        self._route_ray_loggers()

    def _patch_printer(self) -> None:
        """Ray prints worker output, and the errors the cluster pushes to the driver ("(raylet) Task
        ... failed"), through one function, `ray._private.worker.print_to_stdstream` (ray.init binds
        the worker-output printer to it). Taking its place routes both; with no such function (a
        different Ray) worker output stays on the console, as Ray prints it."""
        try:
            from ray._private import worker
        except ImportError:
            return
        original = getattr(worker, "print_to_stdstream", None)
        if original is None:
            return
        self._worker_module, self._ray_printer = worker, original

        def printer(data: dict[str, Any], ignore_prefix: bool = False, **kw: Any) -> None:
            self._on_worker_output(data)
            if self.verbose or self._file is None:
                original(data, ignore_prefix, **kw)

        worker.print_to_stdstream = printer

    def _on_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of lines from one worker process: {pid, actor_name, task_name, is_err, lines}."""
        file = self._file
        if file is None or data.get("pid") == "autoscaler":
            return  # the autoscaler's cluster status every few seconds stays in Ray's monitor.log
        who = data.get("actor_name") or data.get("task_name") or "worker"
        stream = "stderr" if data.get("is_err") else "stdout"
        lines = [line for line in data.get("lines", []) if line.strip()]
        if lines:
            # written as is, not through a formatter: ray.init re-formats the handlers of "ray"
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = "".join(f"{stamp} ({who} pid={data.get('pid')}) {stream}: {line}\n" for line in lines)
            file.acquire()
            try:
                if file.stream is not None:
                    file.stream.write(text)
                    file.flush()
            finally:
                file.release()
        if not self.verbose:
            sink = sys.stderr if data.get("is_err") else sys.stdout
            for line in lines:
                if self.show(line):
                    print(line, file=sink, flush=True)

    # ---- undo ---------------------------------------------------------------------------------
    def __exit__(self, *exc: object) -> None:
        if self._worker_module is not None:
            self._worker_module.print_to_stdstream = self._ray_printer
            self._worker_module = self._ray_printer = None
        for handler in self._silenced:
            handler.removeFilter(self._drop)
        for logger in self._with_file:
            if self._file is not None:
                logger.removeHandler(self._file)
        self._silenced, self._with_file = [], []
        file, self._file = self._file, None  # from here worker output goes to Ray's printer
        if file is not None:
            file.close()


def default_log_file(command: str, directory: str | os.PathLike | None = None) -> Path:
    """`<directory>/<command>-<date>-<time>.log`; `directory` defaults to ./.lmforge/logs, and the
    temp dir stands in when it cannot be created (a read-only working directory in a container)."""
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    folder = Path(directory) if directory is not None else Path(DEFAULT_HOME) / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return (folder / name).absolute()
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"lmforge-{name}"


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
