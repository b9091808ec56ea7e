"""Multi-node Ray without Kubernetes: a pretraining job spans two hosts.

Two network namespaces joined by a veth pair are the two machines (10.77.0.1 and 10.77.0.2, addresses
that exist only inside the namespaces this test makes). A Ray head runs in the first and a Ray worker
node in the second, one CPU each, so the 2-worker Ray Train job must put one worker on each. The
driver (in the head's namespace) runs `lmforge`'s pretraining against the cluster with
`ray.address`, exactly as a user does with two real machines (README, "Multi-node training").

Checked: the cluster had two alive nodes; each rank ran on a different node (their Ray node IPs);
both ranks wrote their part of the checkpoint; the trained weights equal the single-process run's.
Needs root and iproute2 (`ip netns`); skips saying which is missing otherwise. Everything it starts
is stopped by the PIDs `ip netns pids` lists (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "components"))
from _pretrain_data import build_sample_shards, tiny_config  # noqa: E402

from lmforge.components.pretrain import checkpointing, pretrain  # noqa: E402
from lmforge.model import load_model_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HEAD_IP, WORKER_IP, PORT = "10.77.0.1", "10.77.0.2", 6380
RAY_TOL = 2e-5  # 2-worker gloo all-reduce vs. one process: same math, different summation order
SETS = ["schedule.max_steps=6", "checkpoint.every=3", "eval.every=3", "model.overrides.n_layers=2"]

# Run by the driver inside the head's namespace: pretrain on the 2-node cluster through ray.address.
DRIVER = r"""
import json, sys
from pathlib import Path

import ray

sys.path.insert(0, sys.argv[1])
from _pretrain_data import tiny_config
from lmforge.components.pretrain import pretrain

shards, out, marks = (Path(a) for a in sys.argv[2:5])
address = sys.argv[5]
sets = json.loads(sys.argv[6])


def record_node(step, rank):  # runs in each Ray Train worker: which node am I on?
    import ray as r

    (marks / f"rank-{rank}").write_text(r.util.get_node_ip_address())


ray.init(address=address, include_dashboard=False, log_to_driver=False)
nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
ray.shutdown()
cfg = tiny_config(shards, out, *sets, "ray.num_workers=2", f"ray.address={address}")
result = pretrain(cfg, on_step=record_node)
(marks / "result.json").write_text(json.dumps({
    "nodes": nodes, "model_dir": str(result.model_dir), "checkpoint_dir": str(result.checkpoint_dir),
    "step": result.step,
}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _stop_namespace(ns: str) -> None:
    """Stop every process this test started in `ns` (SIGTERM, then SIGKILL), then delete it."""
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    pids = [int(p) for p in listed.stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces (head, worker) joined by a veth pair: two hosts on 10.77.0.0/24."""
    if os.geteuid() != 0:
        pytest.skip("multi-node test needs root (it creates network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("multi-node test needs iproute2's `ip` (apt-get install iproute2)")
    tag = f"lmf{os.getpid() % 100000}"
    head, worker = f"{tag}h", f"{tag}w"
    try:
        _ip("netns", "add", head)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.strip()}")
    try:
        _ip("netns", "add", worker)
        _ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
        for ns, dev, addr in ((head, f"{tag}a", HEAD_IP), (worker, f"{tag}b", WORKER_IP)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield (head, f"{tag}a"), (worker, f"{tag}b")
    finally:
        _stop_namespace(worker)
        _stop_namespace(head)


def _ray_start(host: tuple[str, str], temp_dir: Path, *args: str) -> None:
    """`ray start` in the host's namespace. The node's processes (and so the Ray Train workers) get
    GLOO_SOCKET_IFNAME: the hostname resolves to 127.0.0.1 in a namespace, as on many real machines,
    and gloo would otherwise advertise that address to the other node."""
    ns, dev = host
    ray = Path(sys.executable).with_name("ray")
    cmd = ["ip", "netns", "exec", ns, str(ray), "start", "--num-cpus", "1", "--num-gpus", "0"]
    cmd += ["--temp-dir", str(temp_dir), "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"]
    env = dict(_env(), GLOO_SOCKET_IFNAME=dev)
    done = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, f"ray start failed in {ns}:\n{done.stdout}\n{done.stderr}"


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    env.pop("RAY_ADDRESS", None)
    return env


def test_pretraining_spans_two_nodes(two_hosts, tmp_path: Path) -> None:
    head, worker = two_hosts
    shards = build_sample_shards(tmp_path / "data")
    reference = pretrain(tiny_config(shards, tmp_path / "local", *SETS))

    # Ray's socket paths must stay short (< 108 bytes)
    temp = Path("/tmp") / f"lmf-mn-{os.getpid()}"
    try:
        _ray_start(
            head,
            temp / "h",
            "--head",
            "--node-ip-address",
            HEAD_IP,
            "--port",
            str(PORT),
            "--include-dashboard",
            "false",
        )
        _ray_start(worker, temp / "w", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address", WORKER_IP)

        marks = tmp_path / "marks"
        marks.mkdir()
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        cmd = [
            "ip",
            "netns",
            "exec",
            head[0],
            sys.executable,
            str(script),
            str(REPO / "tests" / "components"),
        ]
        cmd += [str(shards), str(tmp_path / "multinode"), str(marks), f"{HEAD_IP}:{PORT}", json.dumps(SETS)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        assert done.returncode == 0, f"driver failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    result = json.loads((marks / "result.json").read_text())
    assert result["nodes"] == [HEAD_IP, WORKER_IP]
    # one rank per node: the job really spanned both hosts
    assert {(marks / f"rank-{r}").read_text() for r in (0, 1)} == {HEAD_IP, WORKER_IP}
    state = checkpointing.read_state(Path(result["checkpoint_dir"]))
    assert state["world_size"] == 2 and set(state["files"]) == {"0", "1"} and result["step"] == 6

    # the same weights as the single-process run
    ours, ref = (
        load_model_dir(result["model_dir"]).state_dict(),
        load_model_dir(reference.model_dir).state_dict(),
    )
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], atol=RAY_TOL, rtol=0, msg=name)
