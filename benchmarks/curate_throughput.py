"""Curation throughput (MB/s per core) and peak memory, on the sample corpus and on a corpus 10x its size.

    python benchmarks/curate_throughput.py                       # data/sample, workers 1 and 2, 10x corpus
    python benchmarks/curate_throughput.py --corpus DIR --repeat 10 --workers 1 2 4

Each run is `curate()` in a fresh child process while this script polls the resident memory of that
process and all its workers every 20 ms; the peak is the largest sum seen. Throughput is input MB
over the time spent inside `curate()` (worker start-up included, interpreter/import start-up not:
that is reported separately as wall seconds). The 10x corpus is the sample repeated with variation:
copy k > 0 of each file has ~15% of its words replaced (seeded), so the copies are not duplicates
and survive dedup, the worst case for the dedup index. Corpus: data/sample, else /work/shared/sample, else a
generated one. Prints one JSON line per run; "mb_per_s_per_core" = input MB / curate() seconds / workers, and,
because a shared machine's load skews wall time, "mb_per_cpu_second" = input MB / CPU seconds of the
whole process tree (interpreter and import start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000


def find_corpus(arg: str | None, scratch: Path) -> Path:
    for candidate in [Path(arg)] if arg else [REPO / "data" / "sample", Path("/work/shared/sample")]:
        if candidate.is_dir() and any(candidate.rglob("*.*")):
            return candidate
    if arg:
        raise SystemExit(f"corpus {arg} not found")
    return generate_corpus(scratch / "generated", 2_500_000)


def generate_corpus(root: Path, size: int) -> Path:
    """English-like technical prose, ~size bytes in 100 files (only when no real corpus exists)."""
    rng = random.Random(0)
    vocab = (
        "the of and to in is that for with on as be by this are from or an it can you your service "
        "server request cluster node configuration file user data value function module option error "
        "default process memory network client version system command return type string list"
    ).split()
    root.mkdir(parents=True)
    for i in range(100):
        paras = [
            " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 120))).capitalize() + "."
            for _ in range(40)
        ]
        text = "\n\n".join(paras)
        (root / f"doc{i:03d}.txt").write_text(text[: size // 100])
    return root


_WORD = re.compile(r"[A-Za-z]{3,}")


def _swap_words(text: str, rng: random.Random, share: float) -> str:
    """`text` with about `share` of its words replaced by other words of the same text."""
    words = _WORD.findall(text) or ["word"]
    return _WORD.sub(lambda m: rng.choice(words) if rng.random() < share else m.group(0), text)


def build_repeated(src: Path, dst: Path, repeat: int, share: float = 0.15) -> int:
    """dst/copyK/... for K < repeat: copy 0 verbatim, others with `share` of the words swapped."""
    total = 0
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for k in range(repeat):
        for f in files:
            out = dst / f"copy{k}" / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if k == 0 or f.suffix not in (".txt", ".md", ".rst", ".html"):
                shutil.copyfile(f, out)
            else:
                text = f.read_text(encoding="utf-8", errors="replace")
                out.write_text(_swap_words(text, random.Random(f"{k}/{f}"), share), encoding="utf-8")
            total += out.stat().st_size
    return total


CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from lmforge.components.curate import CurateConfig, curate
t = time.perf_counter()
r = curate([{corpus!r}], {out!r}, CurateConfig(num_workers={workers}), overwrite=True, progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t, **r.metrics()}}))
"""


def run_once(corpus: Path, out: Path, workers: int) -> dict:
    import psutil

    code = CHILD.format(repo=str(REPO), corpus=str(corpus), out=str(out), workers=workers)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ps = psutil.Process(proc.pid)
    peak = peak_single = 0
    cpu: dict[int, float] = {}  # pid -> latest user+system seconds (workers included)
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            rss = []
            for p in procs:
                with p.oneshot():
                    rss.append(p.memory_info().rss)
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
            peak, peak_single = max(peak, sum(rss)), max(peak_single, max(rss))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"curate failed:\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(
        wall_seconds=time.perf_counter() - start,
        peak_rss_mb=peak / 2**20,
        peak_rss_single_process_mb=peak_single / 2**20,
        cpu_seconds=sum(cpu.values()),
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="folder to curate (default: data/sample)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=10, help="size multiple of the memory corpus (default 10)")
    args = ap.parse_args()

    machine = {
        "machine": f"{os.cpu_count()}-core CPU",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="lmf-curate-bench-") as tmp:
        scratch = Path(tmp)
        corpus = find_corpus(args.corpus, scratch)
        size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
        for w in args.workers:
            r = run_once(corpus, scratch / f"out-{w}", w)
            print(
                json.dumps(
                    {
                        "bench": "curate_throughput",
                        "corpus": str(corpus),
                        "corpus_mb": size / MB,
                        "workers": w,
                        "curate_seconds": round(r["seconds"], 2),
                        "wall_seconds": round(r["wall_seconds"], 2),
                        "mb_per_s": round(size / MB / r["seconds"], 3),
                        "mb_per_s_per_core": round(size / MB / r["seconds"] / w, 3),
                        "cpu_seconds": round(r["cpu_seconds"], 1),
                        "mb_per_cpu_second": round(size / MB / r["cpu_seconds"], 3),
                        "peak_rss_mb": round(r["peak_rss_mb"], 1),
                        "documents_in": r["documents_in"],
                        "documents_kept": r["documents_kept"],
                        **machine,
                        "load_avg_1m": os.getloadavg()[0],
                    }
                ),
                flush=True,
            )
        big = scratch / f"x{args.repeat}"
        big_size = build_repeated(corpus, big, args.repeat)
        w = max(args.workers)
        r = run_once(big, scratch / "out-big", w)
        print(
            json.dumps(
                {
                    "bench": "curate_peak_memory",
                    "corpus_mb": big_size / MB,
                    "repeat": args.repeat,
                    "workers": w,
                    "curate_seconds": round(r["seconds"], 2),
                    "wall_seconds": round(r["wall_seconds"], 2),
                    "mb_per_s": round(big_size / MB / r["seconds"], 3),
                    "mb_per_s_per_core": round(big_size / MB / r["seconds"] / w, 3),
                    "cpu_seconds": round(r["cpu_seconds"], 1),
                    "mb_per_cpu_second": round(big_size / MB / r["cpu_seconds"], 3),
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    "peak_rss_single_process_mb": round(r["peak_rss_single_process_mb"], 1),
                    "documents_in": r["documents_in"],
                    "documents_kept": r["documents_kept"],
                    "near_duplicates": r["near_duplicates"],
                    "exact_duplicates": r["exact_duplicates"],
                    **machine,
                    "load_avg_1m": os.getloadavg()[0],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
