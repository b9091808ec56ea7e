"""`curate(inputs, output_dir, config)`: raw documents in, a clean deduplicated dataset + datacard out.

Flow:
  parent: list sources (errors for missing inputs happen here, before any work) -> plan work units
  workers (multiprocessing, `num_workers` processes): read, decode, normalize, filter, sign, redact
  parent, in input order: exact + near dedup -> split by id hash -> write JSONL shards -> ledger
Work units go out at most two per worker ahead of the one being consumed, so memory stays bounded
(~2 x workers x task_bytes of text in flight, plus the dedup index) however large the input, and
results are consumed in submission order, so the output is byte-identical for any worker count.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.components.curate.config import CurateConfig, public_dict
from lmforge.components.curate.datacard import Ledger, write_datacard
from lmforge.components.curate.dedup import Deduplicator
from lmforge.components.curate.output import REJECTIONS, SplitWriter, prepare_output
from lmforge.components.curate.process import DocResult, Processor, init_worker, run_task
from lmforge.components.curate.readers import Part, list_sources, plan_tasks
from lmforge.components.curate.s3 import S3Settings
from lmforge.components.curate.split import SPLITS, assign_split

MIN_BYTES_PER_AUTO_WORKER = 8 << 20  # with num_workers: null, one more worker per 8 MiB of input


@dataclass
class CurateResult:
    output_dir: Path
    datacard_path: Path
    datacard_md_path: Path
    files: dict[str, list[Path]]  # per split
    datacard: dict[str, Any]

    def metrics(self) -> dict[str, int]:
        c = self.datacard
        return {
            "documents_in": c["documents"]["in"],
            "documents_kept": c["documents"]["kept"],
            "documents_rejected": c["documents"]["rejected"],
            "bytes_in": c["bytes"]["in"],
            "bytes_out": c["bytes"]["out"],
            "exact_duplicates": c["duplicates"]["exact"],
            "near_duplicates": c["duplicates"]["near"],
            "pii_replacements": sum(c["pii_replacements"].values()),
            **{f"{s}_documents": c["splits"][s]["documents"] for s in SPLITS},
        }


def _run_tasks(
    tasks: list[list[Part]], cfg: CurateConfig, s3: S3Settings | None, workers: int
) -> Iterator[list[DocResult]]:
    """Results of each work unit, in task order."""
    if workers <= 1:
        proc = Processor(cfg, s3)
        for task in tasks:
            yield proc.run_task(task)
        return
    # forkserver (where available): workers start clean, without inheriting threads or locks of
    # the caller (tqdm, tokenizers, torch), yet the imports are paid once, in the server, not per worker.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["lmforge.components.curate.process"])
    else:
        ctx = mp.get_context("spawn")
    # An executor rather than multiprocessing.Pool: if a worker dies (e.g. killed for memory) the
    # run fails with BrokenProcessPool instead of waiting forever for the lost result.
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(cfg, s3)) as pool:
        pending: deque = deque()
        todo = iter(tasks)
        for task in todo:
            pending.append(pool.submit(run_task, task))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(run_task, nxt))
            yield result


def curate(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    config: CurateConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> CurateResult:
    """Curate `inputs` (local paths and s3:// URIs) into `output_dir`; see the module docstring."""
    from tqdm import tqdm

    cfg = config or CurateConfig()
    output_dir = Path(output_dir)
    sources, s3, excluded = list_sources(inputs, cfg)
    prepare_output(output_dir, overwrite)
    tasks = plan_tasks(sources, cfg.task_bytes)
    total_bytes = sum(s.size for s in sources)
    if cfg.num_workers is None:
        # Auto: a worker costs seconds to start (imports), so small inputs stay in this process.
        auto = min(os.cpu_count() or 1, -(-total_bytes // MIN_BYTES_PER_AUTO_WORKER))
        workers = max(1, min(auto, len(tasks)))
    else:
        workers = max(1, min(cfg.num_workers, len(tasks)))

    input_names = [str(i) for i in inputs]
    ledger = Ledger(
        input_names, [sum(1 for s in sources if s.input_index == i) for i in range(len(input_names))]
    )
    dedup = Deduplicator(cfg.dedup)
    writer = SplitWriter(output_dir, cfg.shard_bytes)
    bar = tqdm(unit="doc", desc="curate", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    rejections = open(output_dir / REJECTIONS, "w", encoding="utf-8")
    try:
        for results in _run_tasks(tasks, cfg, s3, workers):
            for r in results:
                reason = r.reason if r.reason is not None else dedup.check(r.key, r.signature)
                if reason is not None:
                    ledger.reject(r.input_index, r.raw_bytes, reason, r.encoding, r.detail)
                    entry = {"id": r.doc_id, "source": r.source_id, "reason": reason, "bytes": r.raw_bytes}
                    rejections.write(
                        json.dumps({**entry, "detail": r.detail} if r.detail else entry, ensure_ascii=False)
                        + "\n"
                    )
                    continue
                split = assign_split(r.doc_id, cfg.split)
                writer.write(split, {"id": r.doc_id, "text": r.text, "source": r.source_id})
                ledger.keep(r.input_index, r.raw_bytes, split, len(r.text.encode("utf-8")), r.pii, r.encoding)
            bar.set_postfix(kept=ledger.kept, refresh=False)
            bar.update(len(results))
    finally:
        bar.close()
        rejections.close()
    files, content_sha = writer.finish()
    card = ledger.finalize(
        files,
        content_sha,
        public_dict(cfg),
        output_dir,
        extra={
            "rejections_file": REJECTIONS,
            "sources": {
                "files": len(sources),
                "excluded_files": len(excluded),  # matched input.exclude: never read
                "bytes_on_disk": total_bytes,
                "work_units": len(tasks),
                "workers": workers,
            },
        },
    )
    json_path, md_path = write_datacard(output_dir, card)
    return CurateResult(
        output_dir, json_path, md_path, {s: [output_dir / f["path"] for f in files[s]] for s in SPLITS}, card
    )
