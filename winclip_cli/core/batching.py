"""How many model inputs go into one batch: the size that gives the best images/s, from measurements.

``--batch-size auto`` (the default) asks :func:`auto_batch_size`; an explicit ``--batch-size N`` wins.
The rule is written down from ``benchmarks/batch_size.py`` (README, section Speed, lists the machine
of each measurement):

* CPU: a WinCLIP pass is one full image plus every window of every scale, so one image is already
  hundreds of short sequences (365 windows for the default 15x15 grid and scales 2, 3), and a batch
  of B images runs B times as many through each layer at once. Measured on a 2-core Sapphire Rapids
  with the scan's allocator setting (``jobs/allocator.py``; without it every activation above 32 MB
  was page-faulted in afresh, which made batches past 2 slower per image, and is what the earlier
  rule of this module followed): ViT-B-16-plus-240 (673 GFLOP per image) costs the same per image
  at batch 2, 4 and 8 in fp32 (within 3 %), 3-7 % less than at batch 1; in bf16 (AMX) batch 2 / 4 / 8 cost 0.76 /
  0.73 / 0.71x of batch 1. A small model costs little per image and much per batch (Python, thread
  wake-ups), so it wants large batches. The rule: the largest batch of at most :data:`CPU_MAX_BATCH`
  whose work stays within the precision's budget in :data:`CPU_GFLOP_PER_BATCH` (fp32: 2 of the
  default model, the smallest of the equally fast sizes, less memory and earlier first results;
  bf16: 8), at least 1.
* CUDA: :data:`CUDA_BATCH` (a GPU needs many inputs in flight; from the H200 rows of the README, not
  re-measured per model); memory is the limit, and an out-of-memory error names ``--batch-size``.
* Apple MPS: :data:`OTHER_BATCH`, the earlier default (not measured).

Batch composition moves fp32 scores only by float rounding (about 1e-7): a GEMM of other shape
sums in another order. Scores are otherwise independent of the batch size.

This module imports neither torch nor open_clip; :func:`visual_facts` reads a loaded tower's sizes
by attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from winclip_cli.options import BatchSize, Precision

# best measured, per precision: fp32 flat from 2 to 8 default-model images (2 x 673 GFLOP fits, 3 does
# not), bf16 best at 8 (8 x 673 fits); fp16 does not run on the CPU
CPU_GFLOP_PER_BATCH = {Precision.FP32: 1500.0, Precision.BF16: 5500.0}
CPU_MAX_BATCH = 8  # small models: the per-batch overhead is paid once per 8 inputs
CUDA_BATCH = 32
OTHER_BATCH = 8


@dataclass(frozen=True)
class VisualFacts:
    """The sizes of a ViT visual tower that decide its cost per image."""

    width: int  # transformer width C
    mlp_width: int  # hidden width of each MLP
    layers: int
    grid: tuple[int, int]  # patch grid (rows, columns)
    patch_size: int
    embed_dim: int  # output (projection) width

    def gflop_per_image(self, scales: Sequence[int]) -> float:
        """Multiply-adds x 2 of one WinCLIP pass: patch embedding, the full image, every window of every scale."""
        rows, cols = self.grid
        patches = rows * cols
        sequences = [(1, patches + 1)] + [((rows - s + 1) * (cols - s + 1), s * s + 1) for s in scales]
        total = 2.0 * patches * 3 * self.patch_size**2 * self.width
        for count, length in sequences:
            linear = 2.0 * length * (4 * self.width**2 + 2 * self.width * self.mlp_width)
            attention = 4.0 * length * length * self.width
            total += count * (self.layers * (linear + attention) + 2.0 * self.width * self.embed_dim)
        return total / 1e9


def visual_facts(visual: Any) -> VisualFacts:
    """The sizes of an open_clip ``VisionTransformer`` (read by attribute, no torch needed here)."""
    block = visual.transformer.resblocks[0]
    patch = visual.conv1.kernel_size
    proj = getattr(visual, "proj", None)
    return VisualFacts(
        width=int(visual.conv1.out_channels),
        mlp_width=int(block.mlp.c_fc.out_features),
        layers=len(visual.transformer.resblocks),
        grid=(int(visual.grid_size[0]), int(visual.grid_size[1])),
        patch_size=int(patch[0] if isinstance(patch, tuple | list) else patch),
        embed_dim=int(proj.shape[1]) if proj is not None else int(visual.conv1.out_channels),
    )


def auto_batch_size(device_type: str, gflop_per_image: float, precision: str, freed_memory_kept: bool) -> int:
    """The batch size of ``--batch-size auto`` for a device type (cpu, cuda, mps), a model's cost per
    image and the precision the tower computes in (see the module's docstring). Without freed memory
    kept (``jobs/allocator.py``: macOS, musl, a user's own allocator settings) the fp32 budget serves
    every precision: measured so, bf16 was fastest at 2 of the default model and slower at 4 and 8."""
    if device_type == "cuda":
        return CUDA_BATCH
    if device_type != "cpu":
        return OTHER_BATCH
    kind = Precision.parse(precision) if freed_memory_kept else Precision.FP32
    budget = CPU_GFLOP_PER_BATCH.get(kind, CPU_GFLOP_PER_BATCH[Precision.FP32])
    fits = int(budget // max(gflop_per_image, 1e-9))
    return max(1, min(CPU_MAX_BATCH, fits))


def fastest_batch(seconds_per_image: Mapping[int, float], tolerance: float = 0.03) -> int:
    """The batch size with the best measured rate; of sizes within ``tolerance`` of the best, the
    smallest (less memory, earlier first results). Used by ``benchmarks/batch_size.py``."""
    best = min(seconds_per_image.values())
    return min(size for size, seconds in seconds_per_image.items() if seconds <= best * (1 + tolerance))


def resolve_batch_size(
    requested: BatchSize,
    device_type: str,
    visual: Any,
    scales: Sequence[int],
    precision: str,
    freed_memory_kept: bool,
) -> int:
    """``--batch-size``: a number as given, or ``auto`` chosen by :func:`auto_batch_size`."""
    if not requested.is_auto:
        return int(requested.value)
    return auto_batch_size(device_type, visual_facts(visual).gflop_per_image(scales), precision, freed_memory_kept)
