"""Running an exported decoder with onnxruntime: prefill, decode steps, greedy generation.

    session = OnnxDecoderSession(out_dir / "model.onnx")
    ids = session.greedy(prompt_ids, max_new_tokens=32, eos_token_id=eos)   # list[int], prompt excluded

The cache lives outside the graph: each call returns the presents, which the next call takes as its
pasts (numpy arrays, grown by one position per step).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


class OnnxDecoderSession:
    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        shape = self.session.get_inputs()[1].shape  # (batch, K, past, D)
        self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        shape = (batch_size, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def __call__(
        self, input_ids: np.ndarray, past: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (B, T, V), presents) for `input_ids` (B, T) after `past` (B, K, P, D) each."""
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
        feed.update(zip(self.past_names, past, strict=True))
        logits, *presents = self.session.run(None, feed)
        return logits, presents

    def greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
    ) -> list[int]:
        """Argmax continuation of one prompt (the prompt's prefill, then one token per step)."""
        logits, past = self(np.asarray([list(prompt_ids)]), self.empty_past(1))
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos_token_id:
                break
            logits, past = self(np.asarray([[token]]), past)
        return out
