"""Dataset discovery on tiny MVTec-AD, VisA and generic folders built with Pillow."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from winclip_cli.errors import SetupError
from winclip_cli.io.datasets import Category, LabelledImage, discover_categories, draw_references, load_mask


def _image(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    """Write a flat grey RGB PNG (or other format by extension) of size (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _mask(path: Path, box: tuple[int, int, int, int] = (2, 2, 5, 5), size: tuple[int, int] = (8, 8)) -> Path:
    """Write an L-mode mask PNG: 255 inside box (x0, y0, x1, y1 exclusive), 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    values[y0:y1, x0:x1] = 255
    Image.fromarray(values).save(path)
    return path


def _mvtec(root: Path, name: str = "bottle") -> Path:
    cat = root / name
    for stem in ("000", "001", "002"):
        _image(cat / "train" / "good" / f"{stem}.png")
    _image(cat / "test" / "good" / "000.png")
    _image(cat / "test" / "broken_large" / "000.png")
    _image(cat / "test" / "broken_large" / "001.png")
    _image(cat / "test" / "contamination" / "000.png")
    _mask(cat / "ground_truth" / "broken_large" / "000_mask.png")
    _mask(cat / "ground_truth" / "broken_large" / "001_mask.png")
    # contamination/000 has no mask on purpose.
    return cat


def _visa(root: Path, name: str = "candle") -> Path:
    cat = root / name
    for stem in ("0000", "0001"):
        _image(cat / "train" / "good" / f"{stem}.JPG")
    _image(cat / "test" / "good" / "0002.JPG")
    _image(cat / "test" / "bad" / "0100.JPG")
    _image(cat / "test" / "bad" / "0101.JPG")
    _mask(cat / "ground_truth" / "bad" / "0100.png")  # VisA: no _mask suffix
    _mask(cat / "ground_truth" / "bad" / "0101_mask.png")  # accepted too
    return cat


def _generic(root: Path, name: str = "widget") -> Path:
    cat = root / name
    _image(cat / "good" / "a.png")
    _image(cat / "good" / "b.jpeg")
    _image(cat / "bad" / "c.png")
    _image(cat / "bad" / "d.png")
    _mask(cat / "masks" / "c.png")
    _mask(cat / "masks" / "a.png")  # a mask for a normal image: ignored
    return cat


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def test_mvtec_category(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    (category,) = discover_categories(tmp_path)
    assert category.name == "bottle"
    assert category.layout == "mvtec"
    assert category.train_good == [cat / "train" / "good" / f"{s}.png" for s in ("000", "001", "002")]
    assert category.test == [
        LabelledImage(
            cat / "test" / "broken_large" / "000.png", 1, "broken_large", cat / "ground_truth/broken_large/000_mask.png"
        ),
        LabelledImage(
            cat / "test" / "broken_large" / "001.png", 1, "broken_large", cat / "ground_truth/broken_large/001_mask.png"
        ),
        LabelledImage(cat / "test" / "contamination" / "000.png", 1, "contamination", None),
        LabelledImage(cat / "test" / "good" / "000.png", 0, "good", None),
    ]


def test_visa_category(tmp_path: Path) -> None:
    cat = _visa(tmp_path)
    (category,) = discover_categories(tmp_path)
    assert category.name == "candle"
    assert category.layout == "visa"
    assert [p.name for p in category.train_good] == ["0000.JPG", "0001.JPG"]  # upper-case extension
    by_name = {item.path.name: item for item in category.test}
    assert by_name["0100.JPG"].mask == cat / "ground_truth" / "bad" / "0100.png"
    assert by_name["0101.JPG"].mask == cat / "ground_truth" / "bad" / "0101_mask.png"
    assert by_name["0100.JPG"].defect == "bad" and by_name["0100.JPG"].label == 1
    assert by_name["0002.JPG"] == LabelledImage(cat / "test" / "good" / "0002.JPG", 0, "good", None)


def test_generic_category(tmp_path: Path) -> None:
    cat = _generic(tmp_path)
    (category,) = discover_categories(cat)  # the root is the category itself
    assert category.name == "widget"
    assert category.layout == "generic"
    # No training split: the references come from the good images themselves.
    assert category.train_good == [cat / "good" / "a.png", cat / "good" / "b.jpeg"]
    assert category.test == [
        LabelledImage(cat / "bad" / "c.png", 1, "bad", cat / "masks" / "c.png"),
        LabelledImage(cat / "bad" / "d.png", 1, "bad", None),
        LabelledImage(cat / "good" / "a.png", 0, "good", None),  # its mask file is ignored
        LabelledImage(cat / "good" / "b.jpeg", 0, "good", None),
    ]


def test_generic_mask_suffix_accepted(tmp_path: Path) -> None:
    cat = _generic(tmp_path)
    _mask(cat / "masks" / "d_mask.png")
    (category,) = discover_categories(cat)
    assert {item.path.name: item.mask for item in category.test}["d.png"] == cat / "masks" / "d_mask.png"


def test_several_categories_sorted_by_name(tmp_path: Path) -> None:
    _visa(tmp_path, "pcb1")
    _mvtec(tmp_path, "zipper")
    _mvtec(tmp_path, "bottle")
    _generic(tmp_path, "gadget")
    (tmp_path / "split_csv").mkdir()  # VisA root clutter: not a category, skipped
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    (tmp_path / "readme.txt").write_text("hello")
    categories = discover_categories(tmp_path)
    assert [(c.name, c.layout) for c in categories] == [
        ("bottle", "mvtec"),
        ("gadget", "generic"),
        ("pcb1", "visa"),
        ("zipper", "mvtec"),
    ]


def test_single_category_root(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    (category,) = discover_categories(cat)
    assert category.name == "bottle"
    assert len(category.test) == 4


def test_hidden_and_non_image_files_skipped(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    _image(cat / "train" / "good" / ".hidden.png")
    (cat / "train" / "good" / "notes.txt").write_text("x")
    (cat / "train" / "good" / "Thumbs.db").write_bytes(b"x")
    _image(cat / "test" / "good" / "001.TIFF")
    _image(cat / "test" / "good" / "002.webp")
    _image(cat / "test" / "good" / "003.bmp")
    (cat / "test" / ".cache").mkdir()  # a hidden folder is no defect type
    _image(cat / "test" / ".cache" / "x.png")
    (category,) = discover_categories(tmp_path)
    assert [p.name for p in category.train_good] == ["000.png", "001.png", "002.png"]
    good = [item.path.name for item in category.test if item.label == 0]
    assert good == ["000.png", "001.TIFF", "002.webp", "003.bmp"]
    assert {item.defect for item in category.test} == {"good", "broken_large", "contamination"}


def test_missing_ground_truth_folder_gives_no_masks(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    for mask in (cat / "ground_truth" / "broken_large").iterdir():
        mask.unlink()
    (cat / "ground_truth" / "broken_large").rmdir()
    (category,) = discover_categories(tmp_path)
    assert all(item.mask is None for item in category.test)
    assert sum(item.label for item in category.test) == 3


def test_unrecognised_layout_raises(tmp_path: Path) -> None:
    _image(tmp_path / "photos" / "a.png")
    (tmp_path / "train").mkdir()  # train/ alone (no train/good, no test) is not enough
    with pytest.raises(SetupError, match="no evaluation data recognised") as info:
        discover_categories(tmp_path)
    assert "train/good/" in str(info.value) and "bad/" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="not found"):
        discover_categories(tmp_path / "nope")
    _image(tmp_path / "file.png")
    with pytest.raises(SetupError, match="not found"):
        discover_categories(tmp_path / "file.png")


def test_category_without_test_images_raises(tmp_path: Path) -> None:
    cat = tmp_path / "empty"
    _image(cat / "train" / "good" / "000.png")
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(SetupError, match="'empty' .mvtec layout. has no test images"):
        discover_categories(tmp_path)


# --------------------------------------------------------------------------------------------------
# load_mask
# --------------------------------------------------------------------------------------------------


def test_load_mask_none_is_all_false() -> None:
    mask = load_mask(None, (3, 5))
    assert mask.shape == (3, 5) and mask.dtype == bool and not mask.any()


def test_load_mask_nonzero_is_anomalous(tmp_path: Path) -> None:
    values = np.zeros((4, 6), dtype=np.uint8)
    values[1, 2] = 1  # any nonzero value counts, not just 255
    values[3, 5] = 255
    Image.fromarray(values).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", (4, 6))
    assert mask.dtype == bool
    assert np.array_equal(mask, values != 0)


def test_load_mask_rgb_rgba_and_binary(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha must not count
    rgba[0, 1, 2] = 9  # blue only
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    expected = np.zeros((2, 3), dtype=bool)
    expected[0, 1] = True
    assert np.array_equal(load_mask(tmp_path / "rgba.png", (2, 3)), expected)

    Image.fromarray(expected).save(tmp_path / "one_bit.png")  # mode "1"
    assert np.array_equal(load_mask(tmp_path / "one_bit.png", (2, 3)), expected)

    palette = Image.fromarray(expected.astype(np.uint8)).convert("P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white: anomalous
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(load_mask(tmp_path / "palette.png", (2, 3)), ~expected)


def test_load_mask_resized_with_nearest(tmp_path: Path) -> None:
    # A 4x4 (W x H) mask with its left half set, loaded for an 8 (H) x 2 (W) image.
    _mask(tmp_path / "m.png", box=(0, 0, 2, 4), size=(4, 4))
    mask = load_mask(tmp_path / "m.png", (8, 2))
    assert mask.shape == (8, 2)
    assert mask[:, 0].all() and not mask[:, 1].any()  # still binary, left column set


def test_load_mask_unreadable(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SetupError, match="cannot read mask"):
        load_mask(tmp_path / "bad.png", (8, 8))
    with pytest.raises(SetupError, match="cannot read mask"):
        load_mask(tmp_path / "missing.png", (8, 8))


# --------------------------------------------------------------------------------------------------
# draw_references
# --------------------------------------------------------------------------------------------------


def _category(n: int) -> Category:
    paths = [Path(f"/data/cat/train/good/{i:03d}.png") for i in range(n)]
    return Category(name="cat", layout="mvtec", train_good=paths, test=[])


def test_draw_references_without_seed_takes_first_sorted() -> None:
    category = _category(10)
    assert draw_references(category, 3, None) == category.train_good[:3]
    assert draw_references(category, 0, None) == []


def test_draw_references_seeded_is_reproducible_and_sorted() -> None:
    category = _category(50)
    first = draw_references(category, 4, seed=123)
    assert first == draw_references(category, 4, seed=123)
    assert first == sorted(first)
    assert len(set(first)) == 4 and set(first) <= set(category.train_good)
    # Different seeds pick different images (overwhelmingly likely with 50 choose 4).
    assert draw_references(category, 4, seed=124) != first
    assert first == sorted(random.Random(123).sample(category.train_good, 4))


def test_draw_references_all_images() -> None:
    category = _category(3)
    assert draw_references(category, 3, seed=7) == category.train_good


@pytest.mark.parametrize(("k", "match"), [(4, "has 3 normal training images, cannot draw 4"), (-1, "0 or more")])
def test_draw_references_bad_k(k, match) -> None:
    with pytest.raises(SetupError, match=match):
        draw_references(_category(3), k, seed=None)


def test_draw_references_from_discovered_category(tmp_path: Path) -> None:
    _mvtec(tmp_path)
    (category,) = discover_categories(tmp_path)
    assert [p.name for p in draw_references(category, 2, None)] == ["000.png", "001.png"]
