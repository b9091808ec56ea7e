"""Variable-length batches without padding compute: `VarlenLayout`.

A fine-tuning micro-batch is a few examples of different lengths. Padded to the longest, every
projection and MLP also runs on the padding (38% of the positions of the bundled task's batches),
and packed rows need a dense (T x T) "same example" mask that makes attention quadratic in the
row, not in the example. Here the batch's real tokens are flattened into one sequence (1, N, C):
everything position-wise (embedding, norms, projections, MLP, the head) runs on the N tokens only.
Attention alone needs the examples apart: `to_grid` gathers each example's q / k / v into its own
row of an (E, L) grid (L = the longest example), where plain causal attention is exact (every
example starts at slot 0, and the unused slots past its end come after all of its tokens, so no
real token attends to them); `from_grid` takes the real slots back. This is the CPU-friendly
counterpart of flash-attention's varlen kernels: two index copies per layer instead of a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VarlenLayout:
    """Where each of the N flattened tokens sits in the (examples, longest) attention grid."""

    to_grid: torch.Tensor  # (E * L,) int64: the token filling each grid slot (unused slots: token 0)
    from_grid: torch.Tensor  # (N,) int64: the grid slot e * L + t of each token
    examples: int  # E
    longest: int  # L

    @classmethod
    def from_segments(cls, segments: torch.Tensor, positions: torch.Tensor) -> VarlenLayout:
        """From a batch of rows: `segments` (B, T) numbers the examples within each row from 1 (0 =
        padding), `positions` (B, T) are the positions within each example (0, 1, ...). Examples are
        contiguous runs of one segment number in a row; tokens are taken in row-major order."""
        keep = segments > 0
        rows = torch.arange(segments.shape[0], device=segments.device).unsqueeze(1).expand_as(segments)
        key = (rows * (int(segments.max()) + 1) + segments)[keep]  # unique per (row, example)
        _, example = torch.unique_consecutive(key, return_inverse=True)
        pos = positions[keep]
        examples, longest = int(example.max()) + 1, int(pos.max()) + 1
        from_grid = example * longest + pos
        to_grid = torch.zeros(examples * longest, dtype=torch.int64, device=segments.device)
        to_grid[from_grid] = torch.arange(from_grid.numel(), device=segments.device)
        return cls(to_grid, from_grid, examples, longest)

    def to(self, device: torch.device | str) -> VarlenLayout:
        return VarlenLayout(self.to_grid.to(device), self.from_grid.to(device), self.examples, self.longest)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, D) -> (E, heads, L, D): each example in its own row, from slot 0."""
        _, heads, _, dim = x.shape
        grid = x.index_select(2, self.to_grid).view(heads, self.examples, self.longest, dim)
        return grid.transpose(0, 1)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """(E, heads, L, D) -> (1, N, heads * D): the real slots back, in token order."""
        E, heads, L, dim = y.shape
        return y.transpose(1, 2).reshape(E * L, heads * dim).index_select(0, self.from_grid).unsqueeze(0)
