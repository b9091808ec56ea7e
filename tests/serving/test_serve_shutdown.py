"""`lmforge serve` as a user (or Kubernetes) runs it: a real subprocess on a free 127.0.0.1 port,
real Ray, real HTTP.

1. SIGTERM while streams are in flight: the server stops taking new requests, lets the running
   generations finish, exits 0 with a short console, and no process it started (raylet, GCS, the
   dashboard and runtime-env agents, workers, replicas) outlives it.
2. A deployment that fails in its replica (weights that cannot be read, which only loading finds):
   one line naming the root cause, exit 1, no traceback, no process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STREAMS = 3  # generated together (one engine slot each)
MAX_TOKENS = 3000  # every stream still running when SIGTERM is sent, on a quiet machine too


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve ...` in its own session; kills everything it started if a test fails."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tmp / "serve.log"
        # Ray's socket paths must stay short (< 108 bytes), and apart from any other Ray on the machine
        self.ray_tmp = Path(f"/tmp/lmf-serve-{os.getpid()}-{self.port}")
        env = {**os.environ, "RAY_TMPDIR": str(self.ray_tmp), "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("RAY_ADDRESS", None)
        self.out_path, self.err_path = tmp / "stdout", tmp / "stderr"
        # append mode: the child's writes land at the end whatever this process reads meanwhile
        self.out, self.err = open(self.out_path, "ab"), open(self.err_path, "ab")
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", "--port", str(self.port)]
        cmd += ["--log-file", str(self.log_file), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self.out, stderr=self.err, env=env, cwd=tmp, start_new_session=True
        )
        self.started: list[psutil.Process] = []
        self.names: dict[int, str] = {}

    def wait_ready(self, timeout: float = 600) -> None:
        """/ready answers 200 and the command has said so (the proxy routes to the replicas a
        moment before `serve.run` returns)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"lmforge serve exited early:\n{self.stderr()}"
            try:
                if (
                    httpx.get(f"{self.url}/ready", timeout=10).status_code == 200
                    and "serving '" in self.stdout()
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout} s:\n{self.stderr()}")

    def track_descendants(self) -> list[psutil.Process]:
        """Every process started under the server so far (kept even after they were reparented)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        known = {p.pid for p in self.started}
        for child in children:
            if child.pid not in known:
                self.started.append(child)
                try:
                    self.names[child.pid] = child.name()
                except psutil.Error:
                    pass
        return self.started

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def close(self) -> None:
        """Whatever the test's outcome: nothing of this server may keep running on the machine."""
        for proc in self.started:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture()
def long_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny random model with room for long generations, so streams are still running when
    SIGTERM arrives."""
    from lmforge.components.tokenizer import TokenizerInfo
    from lmforge.model.checkpoint import save_model_dir
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    info = TokenizerInfo.from_dir(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=info.vocab_size,
        max_seq_len=4096,
        eos_token_id=info.eos_id,
        bos_token_id=info.bos_id,
    )
    out = tmp_path_factory.mktemp("shutdown") / "shutdown-model"
    return save_model_dir(Transformer(cfg).eval(), out, tokenizer_dir=tokenizer_dir)


def stream_completion(url: str, events: dict[str, object], index: int) -> None:
    """One streamed completion; records its chunks' text, finish reason and whether [DONE] came."""
    body = {
        "model": "shutdown-model",
        "prompt": "The quick brown fox",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    result: dict[str, object] = {"texts": texts, "done": False, "finish_reason": None, "usage": None}
    events[f"stream-{index}"] = result
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result["done"] = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result["usage"] = chunk["usage"]
                for choice in chunk.get("choices", []):
                    texts.append(choice.get("text", ""))
                    result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
    except httpx.HTTPError as err:
        result["error"] = repr(err)
    result["finished_at"] = time.monotonic()


def test_sigterm_drains_in_flight_requests_and_leaves_no_process(tmp_path, long_model_dir):
    server = Server(
        tmp_path,
        "--model",
        str(long_model_dir),
        "--served-model-name",
        "shutdown-model",
        "--set",
        f"engine.num_slots={STREAMS}",
        "--drain-timeout",
        "300",
    )
    try:
        server.wait_ready()
        descendants = server.track_descendants()
        names = set(server.names.values())
        assert {"raylet", "gcs_server"} <= names, names  # the test sees Ray's processes

        events: dict[str, object] = {}
        threads = [
            threading.Thread(target=stream_completion, args=(server.url, events, i)) for i in range(STREAMS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while len(events) < STREAMS or not all(r["texts"] for r in events.values()):  # type: ignore[index]
            assert time.monotonic() < deadline, events
            time.sleep(0.05)

        # every stream is running (text received, not done) when the drain begins, i.e. at SIGTERM
        assert not any(r["done"] for r in events.values()), events  # type: ignore[index]
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # the server stops taking requests for the app (its route is gone) while the streams run on
        deadline = time.monotonic() + 300
        while True:
            try:
                status = httpx.get(f"{server.url}/ready", timeout=5).status_code
            except httpx.HTTPError:
                status = 0
            if status != 200:
                break
            assert time.monotonic() < deadline, "still ready long after SIGTERM"
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=600)

        results = [events[f"stream-{i}"] for i in range(STREAMS)]
        for r in results:
            summary = {k: v for k, v in r.items() if k != "texts"} | {"chunks": len(r["texts"])}
            assert r.get("status") == 200 and "error" not in r, (summary, server.stderr())
            assert r["done"] and r["finish_reason"] == "length", r
            assert r["usage"]["completion_tokens"] == MAX_TOKENS, r  # type: ignore[index]
        # the streams were in flight at SIGTERM and still finished (the readiness poll above may notice
        # the drain only after a fast machine has finished them: SIGTERM is the reference, not the poll)
        assert min(r["finished_at"] for r in results) > sigterm_at

        assert server.proc.wait(timeout=300) == 0, server.stderr()
        gone, alive = psutil.wait_procs(descendants, timeout=60)
        assert not alive, f"processes outlived lmforge serve: {[(p.pid, p.name()) for p in alive]}"

        out, err = server.stdout(), server.stderr()
        assert "Traceback" not in out + err and "SIGTERM received" not in err, out + err
        assert "serving 'shutdown-model'" in out and "stopped" in out
        assert "finishing the requests in flight" in err
        assert "(ServeController" not in out + err and "(ServeReplica" not in out + err  # Ray's logs: file
        assert str(server.log_file) in out
        assert "ServeReplica" in server.log_file.read_text()
    finally:
        server.close()


def test_a_deployment_that_fails_in_its_replica_is_one_line(tmp_path, model_dir):
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # present (the preflight passes), unreadable
    server = Server(
        tmp_path,
        "--model",
        str(broken),
        env={"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"},  # fail after one replica start, not three
    )
    try:
        deadline = time.monotonic() + 600
        while server.proc.poll() is None:
            server.track_descendants()
            assert time.monotonic() < deadline, "lmforge serve did not give up"
            time.sleep(0.5)
        assert "raylet" in server.names.values(), "Ray never started: the test would prove nothing"
        err = server.stderr()
        assert server.proc.returncode == 1, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err and "(ServeController" not in err, err
        failure = [line for line in lines if line.startswith("lmforge serve: error:")]
        assert len(failure) == 1, err
        assert "lmforge-model-a" in failure[0] and "cannot load model" in failure[0], failure[0]
        assert str(server.log_file) in failure[0]
        gone, alive = psutil.wait_procs(server.started, timeout=60)
        assert not alive, f"processes outlived lmforge serve: {[(p.pid, p.name()) for p in alive]}"
    finally:
        server.close()
