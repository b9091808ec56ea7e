"""Model directories: save and load lmforge models in the Hugging Face Llama layout.

A model directory holds `config.json` (Hugging Face LlamaConfig fields), `model.safetensors` (or
`model.safetensors.index.json` + shards), `generation_config.json` and, when given, the tokenizer
files. It is loadable by `transformers.AutoModelForCausalLM.from_pretrained` unchanged.

Only safetensors are read: a directory that holds only pickled weights (`*.bin`, `*.pt`, ...) is
refused, because unpickling executes arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.model.config import ConfigError, ModelConfig
from lmforge.model.hf_format import from_hf_config, to_hf_config
from lmforge.model.quantized import build_quantized_model, quantization_scheme
from lmforge.model.transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelDirError(ConfigError):
    """A model directory is missing, incomplete, or holds weights lmforge refuses to load."""


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# ---- saving ---------------------------------------------------------------------------------
def save_model_dir(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_metadata: dict | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write the model (and tokenizer files) atomically: into a temp dir, then renamed into place,
    with the permissions the process umask gives new files (not the temp dir's private ones).

    `extra_files` maps a name in the directory to a file copied there last (e.g. an imported
    checkpoint's own generation_config.json, which may list several eos ids)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = model.config
        state = model.state_dict()
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # stored once, as model.embed_tokens.weight
        dtype = next(iter(state.values())).dtype
        tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        hf_config = to_hf_config(cfg, dtype_name(dtype))
        quantization_config = getattr(model, "quantization_config", None)  # set on quantized models
        if quantization_config is not None:
            hf_config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        }
        (tmp / "generation_config.json").write_text(
            json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2) + "\n"
        )
        meta = {"format": "lmforge-model/1", "model_config": cfg.to_dict(), **(extra_metadata or {})}
        (tmp / "lmforge.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        apply_umask_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the set-and-restore fallback
    os.umask(mask)
    return mask


def apply_umask_permissions(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would have given them.

    `tempfile.mkdtemp` creates its directory 0700 and safetensors writes 0600 files, and the atomic
    rename carries those modes into the final model directory: other users, or a serving pod running
    as another uid, could not read it. A published artifact follows the umask (0755/0644 by default)."""
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    root = Path(root)
    os.chmod(root, dir_mode)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise ModelDirError(f"{src} has no tokenizer.json (a Hugging Face fast tokenizer is required)")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ---- loading --------------------------------------------------------------------------------
def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is not a model directory: config.json is missing")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path} is not valid JSON: {err}") from err
    return from_hf_config(hf)


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory, refusing pickled-only checkpoints."""
    d = Path(model_dir)
    index = d / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise ModelDirError(
                f"{d}: shard(s) named in {WEIGHTS_INDEX_NAME} are missing: {', '.join(missing)}"
            )
        return [d / s for s in shards]
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    pickled = sorted(p.name for p in d.iterdir() if p.suffix in PICKLED_SUFFIXES) if d.is_dir() else []
    if pickled:
        raise ModelDirError(
            f"{d} holds only pickled weights ({', '.join(pickled)}); lmforge loads safetensors only, because "
            "unpickling can execute code. Convert them once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
        )
    raise ModelDirError(f"{d} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 over a model directory's weight files, in order (streamed; ~0.5 s per GB here): what
    a fine-tuning checkpoint records of the frozen base it holds no copy of."""
    import hashlib

    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return state


def _metadata(model_dir: str | os.PathLike) -> dict:
    """lmforge.json of a model directory ({} if absent or unreadable: it is informational)."""
    try:
        meta = json.loads((Path(model_dir) / "lmforge.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_model_dir(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Build the model on the meta device and assign the stored tensors (no double allocation).

    A directory whose config.json declares a compressed-tensors `quantization_config` loads with
    its quantized Linear layers as `model.quantized.QuantizedLinear` (see that module)."""
    cfg = read_config(model_dir)
    state = load_state_dict(model_dir, device)
    qc = quantization_scheme(model_dir)
    if qc is not None:
        try:
            model = build_quantized_model(cfg, state, qc, device, dtype)
        except ConfigError as err:
            raise ModelDirError(f"{model_dir}: {err}") from None
        # the output head was quantized from the tied embedding (see quantized.share_tied_embedding)
        head_tied = bool(_metadata(model_dir).get("quantization", {}).get("head_tied"))
        model.head_tied_to_embedding = head_tied  # type: ignore[assignment]
        return model
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state.get("model.embed_tokens.weight", head)):
            raise ModelDirError(
                f"{model_dir}: tie_word_embeddings is true but lm_head.weight differs from the embedding"
            )
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelDirError(
            f"{model_dir}: weights do not match config.json "
            f"(missing: {missing[:5] or 'none'}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5] or 'none'}{'...' if len(unexpected) > 5 else ''})"
        )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.reset_tables(device)
    return model.eval()
