"""The `python_function` flavor of a registered lmforge model: MLflow's loader for a model directory.

A registered version is a model directory with an `MLmodel` file beside `config.json` (see
`lmforge.registry.write_mlmodel`); its pyfunc flavor names this module as `loader_module`, so

    mlflow.pyfunc.load_model("models:/bot@champion").predict({"prompt": "Hello"}, params={"max_tokens": 16})
    mlflow models serve -m models:/bot@champion --env-manager local     # POST /invocations

load the directory into the same continuous-batching engine that `lmforge serve` runs
(`ModelRunner`: chat template, stop tokens, context checks), submit every row at once (they are
batched together) and return one generated text per row.

Input rows: `{"prompt": "text"}` or `{"messages": [{"role": "user", "content": "..."}]}` (rendered
with the tokenizer's chat template), as a pandas DataFrame, a list of such dicts, or one dict (one
row: MLflow reads `{"prompt": ["a", "b"]}` as ONE row holding a list, which is refused).
Params: `max_tokens` (default 64), `temperature` (default 0: greedy).
It lives in serving/ because it is a thin shim over the serving engine; the core only names it.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.registry import PYFUNC_DEFAULT_PARAMS


def _load_pyfunc(path: str) -> LmforgePyfunc:
    """MLflow's entry point (`loader_module`): `path` is the model directory (the MLflow model root)."""
    return LmforgePyfunc(path)


class LmforgePyfunc:
    """A loaded model version answering `predict(rows, params)` with one text per row."""

    def __init__(self, model_dir: str | Path, device: str = "auto") -> None:
        from lmforge.serving.config import EngineConfig
        from lmforge.serving.runner import ModelRunner

        self.runner = ModelRunner.load(Path(model_dir), EngineConfig(device=device), source=str(model_dir))

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> list[str]:
        from lmforge.serving.protocol import GenerationRequest

        values = {**PYFUNC_DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        requests = []
        for i, row in enumerate(_rows(data)):
            prompt, messages = row.get("prompt"), row.get("messages")
            if _missing(prompt) == _missing(messages):
                raise UserError(f"row {i}: give exactly one of 'prompt' (text) or 'messages' (chat)")
            if not _missing(prompt) and not isinstance(prompt, str):
                raise UserError(
                    f"row {i}: 'prompt' must be one string; pass several prompts as rows (a DataFrame "
                    "or a list of {'prompt': ...} dicts)"
                )
            requests.append(
                GenerationRequest(
                    request_id=f"pyfunc-{uuid.uuid4().hex}",
                    prompt=None if _missing(prompt) else prompt,
                    messages=None if _missing(messages) else _messages(messages, i),
                    max_tokens=int(values["max_tokens"]),
                    sampling={"temperature": float(values["temperature"])},
                )
            )
        # the engine's streams are asyncio-friendly; run them on a private loop so predict also works
        # when called from inside a running event loop (MLflow's scoring server)
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._generate_all(requests)).result()

    async def _generate_all(self, requests: list) -> list[str]:
        return list(await asyncio.gather(*(self._generate(r) for r in requests)))

    async def _generate(self, request) -> str:
        text = []
        async for event in self.runner.generate(request):
            if event["type"] == "error":
                raise UserError(f"{event.get('param') or 'request'}: {event['message']}")
            if event["type"] == "delta":
                text.append(event["text"])
        return "".join(text)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value)) if not hasattr(value, "__len__") else False
    except (TypeError, ValueError):
        return False


def _rows(data: Any) -> list[dict[str, Any]]:
    """Rows as dicts, from a DataFrame, a dict (one row, or columns of equal length), strings or dicts."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if len(data) and not {"prompt", "messages"} & set(data.columns):
            raise UserError("the input has no 'prompt' or 'messages' column")
        return data.to_dict(orient="records")
    if isinstance(data, str):
        return [{"prompt": data}]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list | tuple):
        return [{"prompt": row} if isinstance(row, str) else dict(row) for row in data]
    raise UserError(
        f"cannot read prompts from a {type(data).__name__}: give rows with 'prompt' or 'messages'"
    )


def _messages(value: Any, row: int) -> list[dict[str, str]]:
    """Chat messages as plain dicts (MLflow may hand over numpy arrays of dicts)."""
    try:
        out = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(value)]
    except (TypeError, KeyError) as err:
        raise UserError(f"row {row}: messages must be a list of {{'role', 'content'}} objects") from err
    if not out:
        raise UserError(f"row {row}: messages is empty")
    return out
