"""Few-shot mode: `winclip build-refs`, the .npz memory, and `scan --refs`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import SAMPLE_DATA
from helpers import invoke
from winclip_cli.core.winclip import WinClipScorer
from winclip_cli.io.images import load_image, preprocess
from winclip_cli.io.memory import load_memory
from winclip_cli.io.outputs import read_results_csv

GOOD = SAMPLE_DATA / "fabric" / "good"
SAMPLE_TEST = SAMPLE_DATA / "fabric" / "test"


def build(out: Path, tiny_args: list[str], *extra: str, sources: tuple[Path, ...] = (GOOD,)):
    return invoke(["build-refs", *map(str, sources), "--out", str(out), "-q", *tiny_args, *extra])


def test_round_trip_stores_exactly_what_the_scorer_computes(tmp_path, tiny_args, tiny_backbone):
    refs = tmp_path / "refs.npz"
    result = build(refs, tiny_args, "--class", "fabric")
    assert result.exit_code == 0, result.output
    memory = load_memory(refs)
    files = sorted(GOOD.glob("*.jpg"))
    assert memory.k == len(files)
    meta = memory.metadata
    assert [ref["path"] for ref in meta["references"]] == [f"good/{f.name}" for f in files]
    assert all(
        len(ref["sha256"]) == 64 and ref["size"] == f.stat().st_size
        for ref, f in zip(meta["references"], files, strict=True)
    )
    assert meta["architecture"] == "winclip-tiny-test" and meta["scales"] == [2, 3] and meta["input_size"] == [240, 240]
    assert meta["class_name"] == "fabric" and meta["format_version"] == 1 and meta["tool_version"]
    assert len(meta["weights_sha256"]) == 64
    # the same images embedded directly through the core
    bb = tiny_backbone
    batch = torch.stack([preprocess(load_image(f), bb.image_size, bb.mean, bb.std) for f in files])
    emb = WinClipScorer(bb.model.visual, torch.zeros(2, 32)).embed(batch)
    assert np.allclose(memory.patches, emb.patches.numpy(), atol=1e-5)
    assert np.allclose(memory.windows[2], emb.windows[0].numpy(), atol=1e-5)
    assert np.allclose(memory.windows[3], emb.windows[1].numpy(), atol=1e-5)
    assert memory.patches.shape == (4, 225, 64) and memory.windows[3].shape == (4, 169, 32)
    # loading twice gives identical arrays and metadata
    again = load_memory(refs)
    assert again.metadata == memory.metadata and np.array_equal(again.patches, memory.patches)
    assert again.sha256 == memory.sha256


def test_k_first_and_seeded_sample(tmp_path, tiny_args):
    first = tmp_path / "first.npz"
    assert build(first, tiny_args, "--k", "2").exit_code == 0
    assert [r["path"] for r in load_memory(first).metadata["references"]] == [
        "good/textile_0001.jpg",
        "good/textile_0002.jpg",
    ]
    picks = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.npz"
        assert build(out, tiny_args, "--k", "2", "--seed", "7").exit_code == 0
        picks.append([r["path"] for r in load_memory(out).metadata["references"]])
    assert picks[0] == picks[1] and len(picks[0]) == 2


def test_append_grows_k_and_skips_known_files(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    files = sorted(GOOD.glob("*.jpg"))
    assert build(refs, tiny_args, sources=tuple(files[:2])).exit_code == 0
    first = load_memory(refs)
    assert first.k == 2
    result = build(refs, tiny_args, "--append", sources=(GOOD,))
    assert result.exit_code == 0, result.output
    grown = load_memory(refs)
    assert grown.k == 4
    assert len({r["sha256"] for r in grown.metadata["references"]}) == 4
    assert np.array_equal(grown.patches[:2], first.patches)
    # appending the same folder again adds nothing
    assert build(refs, tiny_args, "--append", sources=(GOOD,)).exit_code == 0
    assert load_memory(refs).k == 4


def test_a_reference_scanned_against_its_memory_has_few_shot_map_zero(tmp_path, tiny_args):
    """Few-shot map 0 everywhere => few-shot score and map are exactly half the zero-shot ones."""
    refs = tmp_path / "refs.npz"
    assert build(refs, tiny_args).exit_code == 0
    zero, few = tmp_path / "zero", tmp_path / "few"
    assert invoke(["scan", str(GOOD), "--out", str(zero), "--save-maps", "-q", *tiny_args]).exit_code == 0
    result = invoke(["scan", str(GOOD), "--out", str(few), "--save-maps", "-q", "--refs", str(refs), *tiny_args])
    assert result.exit_code == 0, result.output
    zero_rows, few_rows = read_results_csv(zero / "scores.csv"), read_results_csv(few / "scores.csv")
    for z, f in zip(zero_rows, few_rows, strict=True):
        assert float(f["score"]) == pytest.approx(float(z["score"]) / 2, abs=2e-6)
        assert f["mode"] == "few-shot" and f["k_shot"] == "4" and f["refs"] == str(refs)
        assert f["refs_sha256"] == load_memory(refs).sha256
        z_map = tifffile.imread(zero / "maps" / (z["path"] + ".tiff"))
        f_map = tifffile.imread(few / "maps" / (f["path"] + ".tiff"))
        assert np.allclose(f_map, z_map / 2, atol=2e-6)
    info = json.loads((few / "run.json").read_text())
    assert info["k_shot"] == 4 and info["refs_sha256"] == load_memory(refs).sha256


def test_few_shot_changes_scores_of_other_images(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    assert build(refs, tiny_args).exit_code == 0
    zero, few = tmp_path / "zero", tmp_path / "few"
    assert invoke(["scan", str(SAMPLE_TEST), "--out", str(zero), "-q", *tiny_args]).exit_code == 0
    assert invoke(["scan", str(SAMPLE_TEST), "--out", str(few), "-q", "--refs", str(refs), *tiny_args]).exit_code == 0
    z = [float(r["score"]) for r in read_results_csv(zero / "scores.csv")]
    f = [float(r["score"]) for r in read_results_csv(few / "scores.csv")]
    # images that are not references keep a positive few-shot part: more than half the zero-shot score
    assert all(fi > zi / 2 + 1e-4 for fi, zi in zip(f, z, strict=True))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--scales", "2"], "scales"),
        (["--scales", "1,2,3"], "scales"),
    ],
)
def test_mismatched_memory_is_refused(tmp_path, tiny_args, change, message):
    refs = tmp_path / "refs.npz"
    assert build(refs, tiny_args).exit_code == 0
    result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "o"), "--refs", str(refs), *tiny_args, *change])
    assert result.exit_code == 2
    assert message in result.stderr and "rebuild" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_memory_of_other_weights_is_refused(tmp_path, tiny_args, tiny_model_files):
    config, checkpoint = tiny_model_files
    refs = tmp_path / "refs.npz"
    assert build(refs, tiny_args).exit_code == 0
    state = torch.load(checkpoint, weights_only=True)
    state["visual.proj"] = state["visual.proj"] * 2
    other = tmp_path / "other.pt"
    torch.save(state, other)
    args = ["--model", str(config), "--weights", str(other), "--device", "cpu"]
    result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "o"), "--refs", str(refs), *args])
    assert result.exit_code == 2 and "weights" in result.stderr
    # and build-refs --append refuses to mix them too
    result = build(refs, args, "--append")
    assert result.exit_code == 2 and "weights" in result.stderr


def corrupt_variants(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    variants = {}
    variants["truncated"] = folder / "truncated.npz"
    variants["truncated"].write_bytes(data[: len(data) // 2])
    variants["garbage"] = folder / "garbage.npz"
    variants["garbage"].write_bytes(b"not a zip file at all" * 10)
    variants["foreign"] = folder / "foreign.npz"
    np.savez(variants["foreign"], x=np.zeros(3))
    variants["bad_json"] = folder / "bad_json.npz"
    with np.load(good) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    np.savez(variants["bad_json"], **{**arrays, "metadata": np.array("{not json")})
    variants["wrong_dtype"] = folder / "wrong_dtype.npz"
    np.savez(variants["wrong_dtype"], **{**arrays, "patches": arrays["patches"].astype(np.float64)})
    variants["wrong_shape"] = folder / "wrong_shape.npz"
    np.savez(variants["wrong_shape"], **{**arrays, "windows_2": arrays["windows_2"][:, :10]})
    variants["missing_scale"] = folder / "missing_scale.npz"
    np.savez(variants["missing_scale"], **{k: v for k, v in arrays.items() if k != "windows_3"})
    variants["nan"] = folder / "nan.npz"
    poisoned = arrays["patches"].copy()
    poisoned[0, 0, 0] = np.nan
    np.savez(variants["nan"], **{**arrays, "patches": poisoned})
    variants["directory"] = folder / "a-directory.npz"
    variants["directory"].mkdir()
    return variants


def test_corrupt_memories_are_refused_with_one_line(tmp_path, tiny_args):
    refs = tmp_path / "refs.npz"
    assert build(refs, tiny_args).exit_code == 0
    for name, path in corrupt_variants(refs, tmp_path).items():
        result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "o"), "--refs", str(path), "-q", *tiny_args])
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, result.stderr)
        assert "Traceback" not in result.output


class Tripwire:
    """Unpickling this object would create a file: proof that nothing was unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_array_is_refused_without_unpickling(tmp_path, tiny_args):
    marker = tmp_path / "UNPICKLED"
    Tripwire.marker = marker
    evil = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Tripwire()
    np.savez(evil, metadata=np.array("{}"), patches=payload)
    with zipfile.ZipFile(evil) as z:
        assert "patches.npy" in z.namelist()
    result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "o"), "--refs", str(evil), *tiny_args])
    assert result.exit_code == 2
    assert "pickle" in result.stderr
    assert not marker.exists()


def test_missing_memory_file(tmp_path, tiny_args):
    result = invoke(["scan", str(GOOD), "--out", str(tmp_path / "o"), "--refs", str(tmp_path / "none.npz"), *tiny_args])
    assert result.exit_code == 2 and "not found" in result.stderr and "build-refs" in result.stderr


def test_build_refs_reports_unreadable_references(tmp_path, tiny_args):
    folder = tmp_path / "good"
    folder.mkdir()
    for f in sorted(GOOD.glob("*.jpg"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refs = tmp_path / "refs.npz"
    result = build(refs, tiny_args, sources=(folder,))
    assert result.exit_code == 3
    assert "broken.png" in result.stderr
    assert load_memory(refs).k == 2


def test_build_refs_with_nothing_usable_writes_nothing(tmp_path, tiny_args):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    result = build(tmp_path / "refs.npz", tiny_args, sources=(folder,))
    assert result.exit_code == 2 and not (tmp_path / "refs.npz").exists()
