"""Variable-length batches (model/varlen.py): the flattened, padding-free forward gives the same loss,
logits and gradients as the padded batch with its causal mask, or the packed rows with their
"same example" mask; and the layout's indices are the ones worked out by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, apply_activation_checkpointing
from lmforge.model.varlen import VarlenLayout


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """The dense reference: causal AND same example, (B, 1, T, T)."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    return (same & torch.ones(T, T, dtype=torch.bool).tril()).unsqueeze(1)


def rows_of(lengths: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """segments and positions (B, T) for rows holding examples of the given lengths, right-padded."""
    segments = torch.zeros(len(lengths), T, dtype=torch.int64)
    positions = torch.zeros(len(lengths), T, dtype=torch.int64)
    for r, row in enumerate(lengths):
        start = 0
        for s, n in enumerate(row, 1):
            segments[r, start : start + n] = s
            positions[r, start : start + n] = torch.arange(n)
            start += n
    return segments, positions


def test_layout_indices_by_hand() -> None:
    # row 0: examples of 2 and 3 tokens, then 1 pad; row 1: one example of 4 tokens, 2 pads
    segments, positions = rows_of([[2, 3], [4]], 6)
    layout = VarlenLayout.from_segments(segments, positions)
    assert (layout.examples, layout.longest) == (3, 4)
    # tokens in row-major order: a0 a1 | b0 b1 b2 | c0 c1 c2 c3 -> grid slots e * 4 + t
    assert layout.from_grid.tolist() == [0, 1, 4, 5, 6, 8, 9, 10, 11]
    # each grid row starts with its example's tokens; unused slots hold token 0 (never attended)
    assert layout.to_grid.tolist() == [0, 1, 0, 0, 2, 3, 4, 0, 5, 6, 7, 8]
    x = torch.arange(9.0).view(1, 1, 9, 1)  # (1, heads, N, D)
    grid = layout.gather(x)
    assert grid.shape == (3, 1, 4, 1)
    assert layout.scatter(grid).view(-1).tolist() == list(range(9))  # and back, in token order


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_varlen_forward_equals_masked_rows(packed: bool, checkpointed: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300, n_layers=2)
    assert cfg.n_kv_heads != cfg.n_heads  # grouped-query attention is exercised
    model = Transformer(cfg)
    rows = copy.deepcopy(model)
    if checkpointed:  # after the copy: the wrapped forward is bound to its own blocks
        apply_activation_checkpointing(model)
        apply_activation_checkpointing(rows)
    lengths = [[5, 9], [3, 7, 2], [12]] if packed else [[5], [9], [3], [12]]
    segments, positions = rows_of(lengths, 14)
    inputs = torch.randint(0, 300, segments.shape)
    targets = torch.randint(0, 300, segments.shape)
    targets[segments == 0] = -100  # padding
    targets[positions < 2] = -100  # each example's "prompt"

    mask = packed_mask(segments)
    reference = rows(inputs, positions=positions, attn_mask=mask, targets=targets)
    reference.backward()

    keep = segments > 0
    layout = VarlenLayout.from_segments(segments, positions)
    flat = model(
        inputs[keep].unsqueeze(0),
        positions=positions[keep].unsqueeze(0),
        targets=targets[keep].unsqueeze(0),
        varlen=layout,
    )
    flat.backward()
    torch.testing.assert_close(flat, reference, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), rows.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    with torch.no_grad():  # logits too, position by position
        logits = model(inputs[keep].unsqueeze(0), positions=positions[keep].unsqueeze(0), varlen=layout)
        expected = rows(inputs, positions=positions, attn_mask=mask)[keep].unsqueeze(0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_varlen_batch_must_be_one_flattened_row_with_positions() -> None:
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=300, n_layers=1))
    segments, positions = rows_of([[3], [2]], 3)
    layout = VarlenLayout.from_segments(segments, positions)
    with pytest.raises(ValueError, match="one flattened row"):
        model(torch.zeros(2, 3, dtype=torch.int64), positions=positions, varlen=layout)
    with pytest.raises(ValueError, match="one flattened row"):
        model(torch.zeros(1, 5, dtype=torch.int64), varlen=layout)  # no positions
