"""Labelled evaluation data on disk: MVTec-AD, VisA (1-class split) and a generic good/bad layout.

Only the folder structure is read here; images are decoded later by the evaluator.  Ground-truth
masks are optional: an anomalous image without one gets ``mask=None`` and is left out of the pixel
metrics (it still counts for the image metrics).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from winclip_cli.errors import SetupError
from winclip_cli.io.images import IMAGE_EXTENSIONS, pillow_formats
from winclip_cli.io.safe_fs import open_regular

__all__ = ["Category", "LabelledImage", "discover_categories", "draw_references", "load_mask"]

GOOD = "good"
_EXPECTED = (
    "expected an MVTec-AD or VisA category (train/good/ or good/, test/good/, test/<defect>/, "
    "ground_truth/<defect>/) "
    "or a generic one (good/, bad/, optional masks/), either in the folder itself or in its sub-folders"
)


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation image with its ground truth."""

    path: Path
    label: int
    """0 normal, 1 anomalous."""
    defect: str
    """``"good"`` or the defect folder name."""
    mask: Path | None
    """Ground-truth mask file; None for normal images and for anomalous images without a mask."""


@dataclass(frozen=True)
class Category:
    """One object category to evaluate on its own."""

    name: str
    """Folder name; used as the class name in prompts."""
    layout: str
    """``"mvtec"``, ``"visa"`` or ``"generic"``."""
    train_good: list[Path]
    """Normal training images, sorted; few-shot references are drawn from here."""
    test: list[LabelledImage]
    """Evaluation images, sorted by path."""


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted; hidden files skipped."""
    if not folder.is_dir():
        return []
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise SetupError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(p for p in entries if not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _subfolders(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise SetupError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(p for p in entries if not _is_hidden(p) and p.is_dir())


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of ``folder`` by image stem: ``<stem>_mask.<ext>`` (MVTec) or ``<stem>.<ext>`` (VisA).

    When both spellings exist for one stem the ``_mask`` file wins.
    """
    index: dict[str, Path] = {}
    plain: dict[str, Path] = {}
    for path in _images_in(folder):
        if path.stem.endswith("_mask"):
            index.setdefault(path.stem[: -len("_mask")], path)
        else:
            plain.setdefault(path.stem, path)
    return {**plain, **index}


def _train_good(folder: Path) -> Path:
    """The normal training images of a split category: ``train/good/``, or ``good/`` beside ``test/``
    (the layout of the bundled ``sample_data/fabric``)."""
    return folder / "train" / GOOD if (folder / "train" / GOOD).is_dir() else folder / GOOD


def _layout_of(folder: Path) -> str | None:
    """``"mvtec"``, ``"visa"``, ``"generic"`` or None when ``folder`` is no category."""
    split = (folder / "train" / GOOD).is_dir() or ((folder / GOOD).is_dir() and (folder / "test" / GOOD).is_dir())
    if split and (folder / "test").is_dir():
        defects = {p.name for p in _subfolders(folder / "test")} - {GOOD}
        # VisA's 1-class split names its only defect folder "bad"; MVTec names each defect type.
        return "visa" if defects == {"bad"} else "mvtec"
    if (folder / GOOD).is_dir() and (folder / "bad").is_dir():
        return "generic"
    return None


def _split_category(folder: Path, layout: str) -> Category:
    """MVTec-AD or VisA: train/good, test/<good|defect>, ground_truth/<defect>/ masks."""
    test: list[LabelledImage] = [
        LabelledImage(path=p, label=0, defect=GOOD, mask=None) for p in _images_in(folder / "test" / GOOD)
    ]
    for defect_dir in _subfolders(folder / "test"):
        if defect_dir.name == GOOD:
            continue
        masks = _mask_index(folder / "ground_truth" / defect_dir.name)
        test.extend(
            LabelledImage(path=p, label=1, defect=defect_dir.name, mask=masks.get(p.stem))
            for p in _images_in(defect_dir)
        )
    return Category(
        name=folder.name,
        layout=layout,
        train_good=_images_in(_train_good(folder)),
        test=sorted(test, key=lambda item: item.path),
    )


def _generic_category(folder: Path) -> Category:
    """Generic: good/ and bad/ images, optional masks/ for the bad ones."""
    good = _images_in(folder / GOOD)
    masks = _mask_index(folder / "masks")
    test = [LabelledImage(path=p, label=0, defect=GOOD, mask=None) for p in good]
    test.extend(
        LabelledImage(path=p, label=1, defect="bad", mask=masks.get(p.stem)) for p in _images_in(folder / "bad")
    )
    return Category(name=folder.name, layout="generic", train_good=good, test=sorted(test, key=lambda item: item.path))


def _category(folder: Path, layout: str) -> Category:
    category = _generic_category(folder) if layout == "generic" else _split_category(folder, layout)
    if not category.test:
        raise SetupError(f"category '{category.name}' ({layout} layout) has no test images under {folder}")
    return category


def discover_categories(root: Path) -> list[Category]:
    """Find the categories under ``root``: ``root`` itself, or else each of its sub-folders that is one.

    Layouts, detected per folder:

    - MVTec-AD: ``train/good/``, ``test/good/``, ``test/<defect>/``, masks
      ``ground_truth/<defect>/<stem>_mask.png``. The normal training images may also sit in ``good/``
      beside ``test/`` (as in the bundled ``sample_data/fabric``).
    - VisA after its 1-class split (``split_csv/1cls.csv``): as MVTec-AD with the single defect
      folder ``bad``, masks ``ground_truth/bad/<stem>.png``.  Both mask spellings are accepted in
      either layout.
    - Generic: ``good/`` and ``bad/``, optional masks ``masks/<stem>.png`` or ``<stem>_mask.png``.
      There is no separate training split: ``train_good`` is the good test images themselves, so
      the evaluator must leave the drawn references out of the images it scores.

    Images are the files with an image extension (any case) directly inside those folders; hidden
    files are skipped.  An anomalous image without a mask gets ``mask=None`` (pixel metrics skip
    it); masks of normal images are ignored.  Sub-folders of ``root`` that are no category (e.g.
    VisA's ``split_csv``) are skipped.  Categories come sorted by name.

    Raises :class:`SetupError` when ``root`` is not a folder, when no category is found (naming the
    expected layouts), or when a category has no test images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SetupError(f"evaluation data folder not found: {root}")
    layout = _layout_of(root)
    if layout is not None:
        return [_category(root, layout)]
    found = [(sub, layout) for sub in _subfolders(root) if (layout := _layout_of(sub)) is not None]
    if not found:
        raise SetupError(f"no evaluation data recognised in {root}: {_EXPECTED}")
    return sorted((_category(sub, lay) for sub, lay in found), key=lambda c: c.name)


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as a bool (H, W) array for an image of ``size`` = (height, width).

    None gives an all-False mask.  Any nonzero pixel (in any colour channel; alpha is ignored) is
    anomalous.  A mask of another size is resized to (W, H) with nearest-neighbour sampling, so it
    stays binary.  Unreadable files raise :class:`SetupError`.
    """
    height, width = size
    if height < 1 or width < 1:
        raise SetupError(f"mask size must be positive (got {size})")
    if path is None:
        return np.zeros((height, width), dtype=bool)
    try:
        # opened once without blocking on a FIFO, and only as the formats winclip reads
        with open_regular(path) as handle, Image.open(handle, formats=pillow_formats()) as opened:
            image: Image.Image = opened
            image.load()
            if image.mode == "P":
                # Palette indices say nothing about colour: index 0 may be white.
                image = image.convert("RGBA")
            bands = image.getbands()
            values = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise SetupError(f"cannot read mask {path}: {exc}") from None
    if values.ndim == 3:
        colour = [i for i, band in enumerate(bands) if band != "A"]
        values = values[..., colour]
        anomalous = np.any(values != 0, axis=-1)
    else:
        anomalous = values != 0
    if anomalous.shape != (height, width):
        resized = Image.fromarray(anomalous.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
        anomalous = np.asarray(resized) != 0
    return anomalous


def draw_references(category: Category, k: int, seed: int | None) -> list[Path]:
    """``k`` normal reference images from ``category.train_good``, sorted.

    ``seed`` None takes the first ``k`` (sorted); otherwise ``random.Random(seed).sample`` picks
    them, so a seed always gives the same references.  Raises :class:`SetupError` when ``k`` is
    negative or exceeds the available images.
    """
    if k < 0:
        raise SetupError(f"number of references must be 0 or more (got {k})")
    available = len(category.train_good)
    if k > available:
        raise SetupError(
            f"category '{category.name}' has {available} normal training image{'s' if available != 1 else ''}, "
            f"cannot draw {k} references"
        )
    if seed is None:
        return list(category.train_good[:k])
    return sorted(random.Random(seed).sample(category.train_good, k))
