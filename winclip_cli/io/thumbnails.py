"""JPEG thumbnails of an image and its heatmap overlay, under OUT/thumbs/ (names: io/layout.py).

The scan writes them beside each heatmap; the report shows them, and regenerates a missing heatmap
thumbnail from its heatmap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from winclip_cli.io.layout import thumbnail_relpaths
from winclip_cli.io.outputs import confined_path
from winclip_cli.io.safe_fs import Confined, atomic_write

__all__ = ["THUMB_QUALITY", "THUMB_SIZE", "save_thumbnail", "write_thumbnails"]

THUMB_SIZE = 256  # longest side in pixels
THUMB_QUALITY = 85


def _as_rgb_image(array: np.ndarray, what: str) -> Image.Image:
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    raise ValueError(f"{what} must be (H, W) or (H, W, 3) uint8, got shape {arr.shape}")


def save_thumbnail(image: Image.Image, path: Path | Confined, owned: bool = False) -> None:
    """Shrink (never enlarge) to THUMB_SIZE on the longest side and write a JPEG atomically.

    ``owned``: the caller's image may be shrunk in place (saves copying a full-size image)."""
    thumb = image.convert("RGB") if image.mode != "RGB" else image if owned else image.copy()
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    # No fsync: thumbnails can be regenerated, and a scan writes thousands. An empty file left by a power
    # cut is treated as missing by the report.
    with atomic_write(path, fsync=False) as handle:
        thumb.save(handle, format="JPEG", quality=THUMB_QUALITY)


def write_thumbnails(
    out_dir: Path, image_relpath: str, image_rgb: np.ndarray, heatmap_rgb: np.ndarray
) -> tuple[str, str]:
    """Write JPEG thumbnails of the image and its heatmap overlay under OUT/thumbs/; return their relpaths."""
    image_rel, heat_rel = thumbnail_relpaths(image_relpath)
    image = _as_rgb_image(image_rgb, "image")
    heat = _as_rgb_image(heatmap_rgb, "heatmap")
    out_dir = Path(out_dir)
    save_thumbnail(image, confined_path(out_dir, image_rel), owned=True)  # both made from the arrays above
    save_thumbnail(heat, confined_path(out_dir, heat_rel), owned=True)
    return image_rel, heat_rel
