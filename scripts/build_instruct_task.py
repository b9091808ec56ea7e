"""Build the bundled fine-tuning task (data/finetune/) from the sample corpus: documentation -> answers.

    python scripts/build_instruct_task.py                         # writes data/finetune/*.jsonl + SOURCES.md
    python scripts/build_instruct_task.py --output /tmp/finetune  # elsewhere (the test compares the two)

Two kinds of instruction examples (`prompt` / `response`, lmforge finetune's `instruction` format),
derived by fixed rules from the Sphinx (reST) sources with no model and no randomness (running the
script again gives the same bytes):

  title  the opening prose of a documentation section  -> " " + the section's heading
         (prompt "{prose}\\n\\nTitle:", the prompt of configs/eval-demo.yaml's `titles` task)
  qa     an API entry (`.. function::`, `.. method::`, ...: directive line + first paragraph)
         + "Question: What does the method `decimal.Context.abs` do?" -> " " + the first sentence
         of its description

Split by document, as the demo's curation splits (configs/demo.yaml, `curate.split`):
`train.jsonl` only from documents the curation assigns to train; `heldout.jsonl` only from the
validation / test documents (the ones data/eval/ uses), for the validation loss and for
configs/eval-finetune.yaml. The section / API-entry rules are scripts/build_eval_tasks.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_eval_tasks as rules  # the sibling script's reST rules

REPO = rules.REPO
OUTPUT = REPO / "data" / "finetune"
TRAIN_ITEMS = 600  # per kind (title, qa): ~1,200 training examples, ~0.7 MB
HELDOUT_ITEMS = 40  # per kind
QA_PROMPT = "{block}\n\nQuestion: {question}\nAnswer:"
TITLE_PROMPT = "{prose}\n\nTitle:"


def all_documents(config: Path) -> list[rules.HeldOutDoc]:
    """Every text document of the demo's inputs with the split the demo's curation gives it."""
    from lmforge.components.curate.normalize import normalize_text
    from lmforge.components.curate.readers import list_sources
    from lmforge.components.curate.split import assign_split
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig

    cfg = load(LifecycleConfig, str(config), [])
    inputs = [i if i.startswith("s3://") else str(REPO / i) for i in cfg.inputs]
    docs = []
    for src in list_sources(inputs, cfg.curate).sources:
        if src.kind != "text":
            continue
        path = Path(src.uri)
        text = normalize_text(path.read_text(encoding="utf-8"), cfg.curate.normalize)
        docs.append(rules.HeldOutDoc(src.doc_id, path, assign_split(src.doc_id, cfg.curate.split), text))
    return sorted(docs, key=lambda d: d.doc_id)


def examples(docs: list[rules.HeldOutDoc], per_kind: int) -> list[dict]:
    titles = []
    for doc in docs:
        for section in rules.sections(doc):
            prose = rules.opening_prose(section)
            if prose and len(section.heading) <= 80:
                titles.append(
                    {
                        "id": section.item_id,
                        "kind": "title",
                        "prompt": TITLE_PROMPT.format(prose=prose),
                        "response": " " + section.heading,
                    }
                )
    qa = []
    for doc in docs:
        entries = rules.api_entries(doc)
        names = [e.name for e in entries]
        for e in entries:
            if names.count(e.name) > 1 or e.kind not in rules._QUESTION or len(e.block) > 900:
                continue
            question = rules._QUESTION[e.kind].format(e.name)
            qa.append(
                {
                    "id": e.item_id,
                    "kind": "qa",
                    "prompt": QA_PROMPT.format(block=e.block, question=question),
                    "response": " " + rules.first_sentence(e.description),
                }
            )
    picked = rules._by_hash(titles, key=lambda x: x["id"])[:per_kind]
    picked += rules._by_hash(qa, key=lambda x: x["id"])[:per_kind]
    return sorted(picked, key=lambda x: x["id"])


def build(output: Path, config: Path) -> dict[str, list[dict]]:
    docs = all_documents(config)
    train_docs = [d for d in docs if d.split == "train"]
    held_docs = [d for d in docs if d.split != "train"]
    tasks = {"train": examples(train_docs, TRAIN_ITEMS), "heldout": examples(held_docs, HELDOUT_ITEMS)}
    output.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        rules.write_jsonl(output / f"{name}.jsonl", items)
    (output / "SOURCES.md").write_text(_sources_md(output, config, train_docs, held_docs, tasks))
    return tasks


def _sources_md(output, config, train_docs, held_docs, tasks) -> str:
    shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config

    def count(items, kind):
        return sum(1 for i in items if i["kind"] == kind)

    lines = [
        "# Bundled fine-tuning task: where every example comes from",
        "",
        "Generated by `python scripts/build_instruct_task.py` (do not edit by hand; rerun it). Every",
        "example is derived by fixed rules from Sphinx sources of the bundled sample corpus",
        "(`data/sample/python-docs`, see `data/sample/SOURCES.md`); `train.jsonl` only from documents the",
        f"demo's curation (`{shown}`: `inputs`, `curate.split`) assigns to train, `heldout.jsonl` only",
        "from its validation / test documents.",
        "",
        "Licence: PSF License Agreement, like the sample corpus (`data/sample/LICENSE-PSF.txt`).",
        "",
        "## Rules",
        "",
        "- `title`: prompt = a section's opening plain paragraphs (200-700 characters) + `\\n\\nTitle:`;",
        "  response = a space + the section's heading (verbatim).",
        "- `qa`: prompt = an API entry (directive line + first description paragraph) +",
        "  `\\n\\nQuestion: What does the method `X` do?\\nAnswer:`; response = a space + the first sentence",
        "  of the description. Names documented twice in a document are skipped.",
        f"- At most {TRAIN_ITEMS} (train) / {HELDOUT_ITEMS} (held-out) per kind, in BLAKE2b(id) order,",
        "  then sorted by id.",
        "",
        "## Files",
        "",
        "| file | examples | title | qa | source documents | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        items = tasks[name]
        digest = rules.sha256_file(output / f"{name}.jsonl")
        lines.append(
            f"| {name}.jsonl | {len(items)} | {count(items, 'title')} | {count(items, 'qa')} | "
            f"{len(docs)} | `{digest}` |"
        )
    lines += [
        "",
        "## Held-out source documents",
        "",
        "| document id | split | sha256 of the file |",
        "|---|---|---|",
    ]
    for d in held_docs:
        lines.append(f"| {d.doc_id} | {d.split} | `{rules.sha256_file(d.path)}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args(argv)
    tasks = build(args.output, args.config)
    print(json.dumps({name: len(items) for name, items in tasks.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
