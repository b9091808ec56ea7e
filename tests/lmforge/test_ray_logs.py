"""`RayLogs`: Ray's driver logs and its workers' output go to one file; the console shows only the
lines a command calls its own, unless verbose. Driven through Ray's real logger and printer
(`ray._private.worker.print_to_stdstream`, what Ray calls for every batch of worker output)."""

from __future__ import annotations

import io
import logging

import pytest

from lmforge.ray_logs import RayLogs, default_log_file

ray_worker = pytest.importorskip("ray._private.worker")

PROGRESS = "[pretrain] step 5/10 (50.0%) | loss 6.1645"
NOISE = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."


def worker_batch(*lines: str, is_err: bool = False, actor: str = "RayTrainWorker") -> dict:
    return {"pid": 4242, "actor_name": actor, "task_name": None, "is_err": is_err, "lines": list(lines)}


@pytest.fixture()
def ray_logger():
    """A `ray.*` logger printing to a console stream, like the ones Ray configures."""
    logger = logging.getLogger("ray.lmforge_test")
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, console
    logger.removeHandler(handler)


def test_quiet_ray_loggers_go_to_the_file_only(tmp_path, ray_logger):
    logger, console = ray_logger
    path = tmp_path / "logs" / "run.log"
    with RayLogs(path, verbose=False):
        logger.info("Started a local Ray instance.")
    assert console.getvalue() == ""
    assert "Started a local Ray instance." in path.read_text()
    logger.info("after")  # everything is put back
    assert console.getvalue() == "after\n"
    assert "after" not in path.read_text()


def test_verbose_ray_loggers_go_to_both(tmp_path, ray_logger):
    logger, console = ray_logger
    with RayLogs(tmp_path / "run.log", verbose=True):
        logger.warning("placement group removed")
    assert console.getvalue() == "placement group removed\n"
    assert "placement group removed" in (tmp_path / "run.log").read_text()


def test_quiet_worker_output_shows_only_the_chosen_lines_once(tmp_path, capsys):
    path = tmp_path / "run.log"
    original = ray_worker.print_to_stdstream
    with RayLogs(path, verbose=False, show=lambda line: line.startswith("[pretrain] ")):
        ray_worker.print_to_stdstream(worker_batch(PROGRESS, NOISE), ignore_prefix=False)
        ray_worker.print_to_stdstream(worker_batch(NOISE, is_err=True, actor="PlacementGroupCleaner"), False)
        ray_worker.print_to_stdstream({"pid": "autoscaler", "is_err": False, "lines": ["Node status"]}, False)
    assert ray_worker.print_to_stdstream is original
    out, err = capsys.readouterr()
    assert out == PROGRESS + "\n" and err == ""
    text = path.read_text()
    assert f"(RayTrainWorker pid=4242) stdout: {PROGRESS}" in text
    assert f"(PlacementGroupCleaner pid=4242) stderr: {NOISE}" in text
    assert "Node status" not in text  # the autoscaler's periodic status stays in Ray's own logs


def test_verbose_worker_output_is_printed_by_ray_and_kept_in_the_file(tmp_path, capsys):
    path = tmp_path / "run.log"
    with RayLogs(path, verbose=True, show=lambda line: True):
        ray_worker.print_to_stdstream(worker_batch(NOISE), ignore_prefix=False)
    out, _ = capsys.readouterr()
    assert out.count(NOISE) == 1 and "RayTrainWorker pid=4242" in out  # Ray's own prefixed line
    assert NOISE in path.read_text()


def test_default_log_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = default_log_file("serve")
    assert path.parent == tmp_path / ".lmforge" / "logs" and path.name.startswith("serve-")
    assert default_log_file("pretrain", tmp_path / "out" / "logs").parent == tmp_path / "out" / "logs"
    blocked = tmp_path / "file"
    blocked.write_text("")  # a directory cannot be created here: the temp dir stands in
    fallback = default_log_file("serve", blocked / "logs")
    assert fallback.name.startswith("lmforge-serve-") and fallback.parent.is_dir()
