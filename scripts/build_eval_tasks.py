"""Build the bundled evaluation tasks (data/eval/) from the sample corpus, outside the demo's train split.

    python scripts/build_eval_tasks.py                      # writes data/eval/*.jsonl + SOURCES.md
    python scripts/build_eval_tasks.py --output /tmp/eval   # elsewhere (the test compares the two)

Only documents that the demo's curation (configs/demo.yaml: its `inputs` and `curate.split`) assigns
to validation or test are used, so no item comes from a training document. Every item is derived
from the Sphinx (reST) sources by fixed rules, with no model and no randomness: running the script
again gives the same bytes. The tasks, each a JSONL file read by configs/eval-demo.yaml:

  heldout.jsonl  perplexity: sections of the held-out documents (heading + body) as written.
  titles.jsonl   generate: the opening prose of a section -> its heading.
  qa.jsonl       generate: "What does the method `decimal.Context.abs` do?" over a context of that
                 API entry and its neighbours -> the first sentence of the entry's description.
  choice.jsonl   choice: the opening prose of a section -> its heading among three headings of
                 other held-out documents.

Items are picked by a stable hash order (BLAKE2b of the item id), not by position, so each task
samples all held-out documents. SOURCES.md records the source files and the output files with
their SHA-256, the rules above, and each task's 13-gram overlap with the demo's training documents.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HELDOUT_BYTES = 48_000  # perplexity text in all: the demo suite must run in under 2 minutes on 2 cores
SECTION_CHARS = (300, 6000)  # a perplexity section's length: shorter ones are skipped, longer cut
PASSAGE_CHARS = (200, 700)  # opening prose of a section for the title / choice tasks
MAX_ITEMS = 40  # per title / choice task
QA_ITEMS = 30  # answers are longer to generate than titles
CHOICES = 4
QA_CONTEXT_CHARS = 1500

_ADORNMENT = re.compile(r"^([=\-~^\"*+#`'.:_])\1{2,}$")
_DIRECTIVE = re.compile(
    r"^(?P<indent> *)\.\. (?P<kind>function|method|classmethod|staticmethod|decorator|class|exception|"
    r"attribute|data):: *(?P<signature>.+)$"
)
_MODULE = re.compile(r"^\.\. (?:current)?module:: *(\S+)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*`:])")
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf)\.$")


def stable_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- which documents: the demo curation's non-train split ---------------------------------------------
@dataclass(frozen=True)
class HeldOutDoc:
    doc_id: str  # the curation's document id, e.g. "python-docs/library/filecmp.rst.txt"
    path: Path
    split: str  # validation | test
    text: str  # normalized as curation normalizes it


def split_documents(config: Path) -> tuple[list[HeldOutDoc], list[str]]:
    """(held-out documents, texts of the training documents) of the demo's curation config."""
    from lmforge.components.curate.normalize import normalize_text
    from lmforge.components.curate.readers import list_sources
    from lmforge.components.curate.split import assign_split
    from lmforge.config import load
    from lmforge.pipelines.config import LifecycleConfig

    cfg = load(LifecycleConfig, str(config), [])
    # `make demo` runs from the repository root: its relative inputs are relative to it
    inputs = [i if i.startswith("s3://") else str(REPO / i) for i in cfg.inputs]
    held, train = [], []
    for src in list_sources(inputs, cfg.curate).sources:
        if src.kind != "text":  # the sample is reST sources only; anything else is not read here
            continue
        path = Path(src.uri)
        text = normalize_text(path.read_text(encoding="utf-8"), cfg.curate.normalize)
        split = assign_split(src.doc_id, cfg.curate.split)
        if split == "train":
            train.append(text)
        else:
            held.append(HeldOutDoc(src.doc_id, path, split, text))
    return sorted(held, key=lambda d: d.doc_id), train


# ---- reST structure ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    doc_id: str
    index: int  # position in the document
    heading: str
    underline: str
    body: list[str]  # lines after the heading, up to the next heading

    @property
    def item_id(self) -> str:
        return f"{self.doc_id}#section-{self.index}"


def _is_heading(lines: list[str], i: int) -> bool:
    """Line i is a section title: text at column 0 underlined by punctuation at least as long."""
    title = lines[i]
    if not title.strip() or title[0].isspace() or _ADORNMENT.match(title) or i + 1 >= len(lines):
        return False
    under = lines[i + 1]
    return bool(_ADORNMENT.match(under)) and len(under) >= len(title.rstrip())


def sections(doc: HeldOutDoc) -> list[Section]:
    lines = doc.text.split("\n")
    starts = [i for i in range(len(lines)) if _is_heading(lines, i)]
    out = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        if n + 1 < len(starts) and end > 0 and _ADORNMENT.match(lines[end - 1]):
            end -= 1  # the next title's overline belongs to it
        out.append(Section(doc.doc_id, n, lines[start].strip(), lines[start + 1], lines[start + 2 : end]))
    return out


def paragraphs(lines: list[str]) -> list[str]:
    return [p for p in "\n".join(lines).split("\n\n") if p.strip()]


def opening_prose(section: Section) -> str | None:
    """The section's first plain paragraphs (no directives, code, lists or indented blocks), cut at
    a paragraph boundary; None when there is too little."""
    lo, hi = PASSAGE_CHARS
    kept: list[str] = []
    for para in paragraphs(section.body):
        text = para.strip("\n")
        first = text.split("\n", 1)[0]
        if (
            first[:1].isspace()
            or first.startswith((".. ", "* ", "- ", "#. ", ">>>", "|", "**Source code:**"))
            or "::" in first
            or _ADORNMENT.match(first)  # a transition line
        ):
            if kept:
                break
            continue
        if text.endswith(":"):  # introduces a code sample or list that is not part of the passage
            break
        if kept and len("\n\n".join([*kept, text])) > hi:
            break
        kept.append(text)
    passage = "\n\n".join(kept)
    return passage if lo <= len(passage) <= hi else None


def first_sentence(paragraph: str) -> str:
    text = " ".join(paragraph.split())
    for match in _SENTENCE_END.finditer(text):
        if not _ABBREVIATION.search(text[: match.start()]):
            return text[: match.start()]
    return text


@dataclass(frozen=True)
class ApiEntry:
    doc_id: str
    kind: str
    name: str  # qualified: module.Class.member
    block: str  # the directive line and the first paragraph of its description
    description: str  # that first paragraph

    @property
    def item_id(self) -> str:
        return f"{self.doc_id}#{self.name}"


def api_entries(doc: HeldOutDoc) -> list[ApiEntry]:
    """Sphinx object descriptions (`.. function::`, `.. method::`, ...) with a prose description."""
    lines = doc.text.split("\n")
    module = ""
    classes: list[tuple[int, str]] = []  # (indent, name) of the enclosing class directives
    out = []
    for i, line in enumerate(lines):
        if m := _MODULE.match(line):
            module = m.group(1)
            continue
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        classes = [(ci, cn) for ci, cn in classes if ci < indent]
        name = re.match(r"[\w.]+", m["signature"].replace("@", ""))
        if not name:
            continue
        local = name.group(0)
        if m["kind"] in ("class", "exception"):
            classes.append((indent, local))
        prefix = ".".join([module] * bool(module) + [cn for _, cn in classes if cn != local])
        qualified = local if local.startswith(module + ".") or not prefix else f"{prefix}.{local}"
        description = _description(lines, i, indent)
        if description:
            block = "\n".join([line.strip(), "", description])
            out.append(ApiEntry(doc.doc_id, m["kind"], qualified, block, description))
    return out


def _description(lines: list[str], at: int, indent: int) -> str | None:
    """The first paragraph of the directive body at `at` (options and nested directives skipped)."""
    para: list[str] = []
    for line in lines[at + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # left the directive's body
        stripped = line.strip()
        if not stripped:
            if para:
                break
            continue
        if not para and (stripped.startswith((":", ".. ")) or stripped.endswith("::")):
            continue  # an option line or a nested directive's line
        para.append(stripped)
    text = " ".join(para)
    words = len(first_sentence(text).split()) if text else 0
    return text if words >= 4 and not text.startswith((".. ", ">>>")) else None


# ---- the tasks -----------------------------------------------------------------------------------------
def _by_hash(items: list, key=lambda x: x.item_id) -> list:
    return sorted(items, key=lambda x: stable_key(key(x)))


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a paragraph (else line) boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n\n")
    return head[:cut] if cut > limit // 2 else head[: max(head.rfind("\n"), 1)]


def heldout_task(secs: list[Section]) -> list[dict]:
    lo, hi = SECTION_CHARS
    items, used = [], 0
    for sec in _by_hash(secs):
        text = _cut("\n".join([sec.heading, sec.underline, *sec.body]).strip("\n"), hi)
        size = len(text.encode())
        if len(text) < lo or used + size > HELDOUT_BYTES:
            continue
        items.append({"id": sec.item_id, "source": sec.doc_id, "text": text})
        used += size
    return items


def title_and_choice_tasks(secs: list[Section]) -> tuple[list[dict], list[dict]]:
    """Sections with enough opening prose, alternately (in hash order) a title item or a choice item."""
    usable = [(sec, p) for sec in _by_hash(secs) if (p := opening_prose(sec))]
    titles, choice = [], []
    headings: dict[str, set[str]] = {}
    for sec in secs:
        headings.setdefault(sec.doc_id, set()).add(sec.heading)
    for n, (sec, passage) in enumerate(usable):
        if n % 2 == 0 and len(titles) < MAX_ITEMS:
            titles.append(
                {"id": sec.item_id, "source": sec.doc_id, "document": passage, "title": sec.heading}
            )
        elif n % 2 == 1 and len(choice) < MAX_ITEMS:
            others = sorted(
                {h for doc, hs in headings.items() if doc != sec.doc_id for h in hs} - {sec.heading},
                key=lambda h: stable_key(f"{sec.item_id}\x00{h}"),
            )[: CHOICES - 1]
            answer = int(stable_key(sec.item_id), 16) % CHOICES
            options = others[:answer] + [sec.heading] + others[answer:]
            question = f"{passage}\n\nQuestion: Which section heading does this passage belong to?"
            choice.append(
                {
                    "id": sec.item_id,
                    "source": sec.doc_id,
                    "question": question,
                    "choices": options,
                    "answer": answer,
                }
            )
    return sorted(titles, key=lambda x: x["id"]), sorted(choice, key=lambda x: x["id"])


_QUESTION = {
    "function": "What does the function `{}` do?",
    "method": "What does the method `{}` do?",
    "classmethod": "What does the class method `{}` do?",
    "staticmethod": "What does the static method `{}` do?",
    "decorator": "What does the decorator `{}` do?",
    "class": "What is the class `{}`?",
    "exception": "What is the exception `{}`?",
    "attribute": "What is the attribute `{}`?",
    "data": "What is `{}`?",
}


def qa_task(docs: list[HeldOutDoc]) -> list[dict]:
    """Each question's context is its API entry between the previous and the next entry of the same
    document, so the answer must be found, not just copied from the start."""
    candidates = []
    for doc in docs:
        entries = api_entries(doc)
        names = [e.name for e in entries]
        for k, entry in enumerate(entries):
            if names.count(entry.name) > 1:
                continue  # overloaded names would make the question ambiguous
            around = entries[max(k - 1, 0) : k + 2]
            context = "\n\n".join(e.block for e in around)
            if len(context) > QA_CONTEXT_CHARS:
                continue
            candidates.append((entry, context))
    items = []
    for entry, context in _by_hash(candidates, key=lambda c: c[0].item_id)[:QA_ITEMS]:
        items.append(
            {
                "id": entry.item_id,
                "source": entry.doc_id,
                "context": context,
                "question": _QUESTION[entry.kind].format(entry.name),
                "answer": first_sentence(entry.description),
            }
        )
    return sorted(items, key=lambda x: x["id"])


# ---- output --------------------------------------------------------------------------------------------
TASK_TEXT = {  # the text of an item that decontamination checks
    "heldout": lambda it: it["text"],
    "titles": lambda it: f"{it['document']}\n{it['title']}",
    "qa": lambda it: f"{it['context']}\n{it['question']}\n{it['answer']}",
    "choice": lambda it: f"{it['question']}\n{it['choices'][it['answer']]}",
}


def write_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")


def build(output: Path, config: Path) -> dict[str, list[dict]]:
    from lmforge.components.evaluate.decontaminate import NgramIndex, decontamination_report

    docs, train_texts = split_documents(config)
    secs = [s for d in docs for s in sections(d)]
    titles, choice = title_and_choice_tasks(secs)
    tasks = {"heldout": heldout_task(secs), "titles": titles, "qa": qa_task(docs), "choice": choice}
    output.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        write_jsonl(output / f"{name}.jsonl", items)
    index = NgramIndex.from_texts(train_texts, n=13)
    report = decontamination_report(
        {name: [TASK_TEXT[name](it) for it in items] for name, items in tasks.items()},
        index,
        sys.float_info.min,  # any shared n-gram, as GPT-3 and lm-evaluation-harness count it
    )
    overlap = {
        name: max((index.overlap(TASK_TEXT[name](it)) for it in items), default=0.0)
        for name, items in tasks.items()
    }
    (output / "SOURCES.md").write_text(_sources_md(output, config, docs, tasks, report, overlap))
    return tasks


def _sources_md(output, config, docs, tasks, report, overlap) -> str:
    rel_config = config.resolve().relative_to(REPO) if config.resolve().is_relative_to(REPO) else config
    lines = [
        "# Bundled evaluation tasks: where every item comes from",
        "",
        "Generated by `python scripts/build_eval_tasks.py` (do not edit by hand; rerun it). Every item is",
        "derived by fixed rules from Sphinx sources of the bundled sample corpus (`data/sample/python-docs`,",
        "see `data/sample/SOURCES.md`), and only from the documents that the demo's curation",
        f"(`{rel_config}`: `inputs`, `curate.split`) assigns to validation or test, never to train",
        "(`lmforge.components.curate.split.assign_split` on the curation's document id).",
        "",
        "Licence: PSF License Agreement, like the sample corpus (`data/sample/LICENSE-PSF.txt`).",
        "",
        "## Source documents",
        "",
        "| document id | split | sha256 of the file |",
        "|---|---|---|",
    ]
    lines += [f"| {d.doc_id} | {d.split} | `{sha256_file(d.path)}` |" for d in docs]
    lines += [
        "",
        "## How each task is built",
        "",
        "Sections are found by reST's rule (a title line underlined by punctuation at least as long);",
        "items are taken in the order of BLAKE2b(item id), so every document contributes, then sorted by id.",
        "",
        "- `heldout.jsonl` (perplexity, field `text`): a section as written (its heading, underline and",
        f"  body), {SECTION_CHARS[0]}-{SECTION_CHARS[1]} characters (longer ones cut at a paragraph break),",
        f"  up to {HELDOUT_BYTES:,} bytes in all.",
        "- `titles.jsonl` (generate, `document` -> `title`): the opening plain paragraphs of a section",
        f"  ({PASSAGE_CHARS[0]}-{PASSAGE_CHARS[1]} characters; directives, code, lists and indented blocks",
        "  are skipped) and the section's heading, verbatim.",
        "- `qa.jsonl` (generate, `context` + `question` -> `answer`): Sphinx object descriptions",
        "  (`.. function::`, `.. method::`, `.. class::`, `.. attribute::`, ...). The question names the",
        "  object by its qualified name (module, enclosing class, name); the answer is the first sentence",
        "  of its description; the context holds that entry and the entries before and after it in the",
        "  same document (each: directive line + first description paragraph), so the answer is in the",
        "  context verbatim but must be located. Names documented twice are skipped.",
        "- `choice.jsonl` (choice, `question`, `choices`, `answer`): a section's opening prose (as for",
        f"  titles, from other sections) and {CHOICES} candidate headings: the section's own and",
        f"  {CHOICES - 1} headings of other held-out documents; the right one's position is",
        f"  BLAKE2b(item id) mod {CHOICES}. Sections alternate between titles and choice in hash order,",
        "  so no section is in both.",
        "",
        "## Files",
        "",
        "| file | items | sha256 | items sharing a 13-gram with train | largest share of shared 13-grams |",
        "|---|---:|---|---:|---:|",
    ]
    for name, items in tasks.items():
        r = report[name]
        lines.append(
            f"| {name}.jsonl | {len(items)} | `{sha256_file(output / f'{name}.jsonl')}` | "
            f"{r['contaminated']} of {r['items']} | {overlap[name]:.3f} |"
        )
    lines += [
        "",
        "Contamination is measured with `lmforge.components.evaluate.decontaminate` against every",
        "document the demo's curation assigns to train (before its quality filters and deduplication",
        "drop some, so this is an upper bound); an item's overlap is the share of its word 13-grams",
        "found there. `lmforge evaluate --train-data DIR` measures the same against a real curated split.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "data" / "eval")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args(argv)
    tasks = build(args.output, args.config)
    for name, items in tasks.items():
        print(f"{name}: {len(items)} items", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
