"""The job kernel: one Session streams files for every job, so their rules cannot drift apart."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import invoke
from winclip_cli.core.winclip import ReferenceMemory
from winclip_cli.io.memory import load_memory
from winclip_cli.jobs.kernel import Session
from winclip_cli.jobs.maps import image_score
from winclip_cli.jobs.references import collect_references
from winclip_cli.spec import InputSpec, TextSpec


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def unlistable(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """Make ``locked`` fail to list (as root, chmod 000 would not)."""
    real_scandir = os.scandir

    def scandir(path=".", *args, **kwargs):
        if isinstance(path, str | os.PathLike) and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


def test_reference_memory_owners_by_hand() -> None:
    patches = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)  # 3 entries, G = 2, C = 4
    windows = [np.ones((3, 5, 6), np.float32)]  # one scale, W = 5, D = 6
    memory = ReferenceMemory.from_arrays(patches, windows, entries_per_reference=[2, 1])
    assert memory.patch_owner.tolist() == [0, 0, 0, 0, 1, 1]
    assert memory.window_owner[0].tolist() == [0] * 10 + [1] * 5
    assert torch.equal(memory.patches, torch.from_numpy(patches.reshape(6, 4)))
    assert memory.windows[0].shape == (15, 6)


@pytest.mark.parametrize("command", ["calibrate", "build-refs"])
def test_an_unlistable_folder_makes_calibrate_and_build_refs_exit_3(tmp_path, tiny_args, monkeypatch, command):
    """As in scan: files in a folder that cannot be listed were not used, so the run is incomplete."""
    good = tmp_path / "good"
    make_images(good, 3)
    make_images(good / "locked", 2, seed=1)
    unlistable(monkeypatch, good / "locked")
    out = tmp_path / ("cal.json" if command == "calibrate" else "refs.npz")
    result = invoke([command, good, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 3, result.output
    assert "cannot list" in result.output and "locked" in result.output
    assert out.is_file()  # everything else was used and written
    if command == "build-refs":
        assert load_memory(out).k == 3


def test_eval_memory_is_the_memory_a_memory_file_gives(tmp_path, tiny_args, tiny_options):
    """eval builds its few-shot memory from embeddings exactly as scan loads it from build-refs' file."""
    good = make_images(tmp_path / "good", 3)
    refs = tmp_path / "refs.npz"
    assert invoke(["build-refs", tmp_path / "good", "--out", refs, "-q", *tiny_args]).exit_code == 0
    session = Session.open(tiny_options, InputSpec(), text=None)
    assert session.scorer is None and session.engine is None  # an embedding-only session loads no text
    embedded = collect_references(session.embedded([(p, p.name) for p in good]))
    from_embeddings = embedded.to_reference_memory(session.encoder.scales, session.backbone.device)
    from_file = load_memory(refs).to_reference_memory(session.encoder.scales, session.backbone.device)
    assert torch.equal(from_embeddings.patches, from_file.patches)
    for a, b in zip(from_embeddings.windows, from_file.windows, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(from_embeddings.patch_owner, from_file.patch_owner)


def test_a_session_scores_a_file_like_the_scorer_does(tmp_path, tiny_options):
    """Session.scored is the scorer on the preprocessed image: nothing is lost between file and score."""
    from winclip_cli.io.images import load_image, preprocess

    (path,) = make_images(tmp_path, 1)
    session = Session.open(tiny_options, InputSpec(), text=TextSpec("object"))
    (item,) = list(session.scored([(path, path.name)]))
    prep = session.prep
    batch = preprocess(load_image(path), prep.size, prep.mean, prep.std)[None]
    expected = session.scorer.score_embeddings(session.scorer.embed(batch)).image
    assert image_score(item)[0] == pytest.approx(float(expected[0]), abs=1e-6)


def test_a_failing_collector_stops_the_writer_instead_of_hanging(tmp_path, monkeypatch):
    """A bug in the writer's collector thread is raised at the next submit or at close, never a hang."""
    import threading

    from winclip_cli.jobs.decode import Decoded
    from winclip_cli.jobs.write import ResultWriter, RowContext
    from winclip_cli.spec import OutputSpec

    def broken_count(self, row):
        raise RuntimeError("bug in the collector")

    monkeypatch.setattr(ResultWriter, "_count", broken_count)
    context = RowContext(threshold=0.5, threshold_source="default", mode="zero-shot")
    writer = ResultWriter(OutputSpec(tmp_path), context, print)
    outcome: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(20):  # more than the queue holds: a dead collector used to block this for ever
                writer.submit(Decoded(tmp_path / f"{i}.png", f"{i}.png", error="not an image"))
            writer.close()
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the producer hangs on a dead collector"
    assert len(outcome) == 1 and "bug in the collector" in str(outcome[0])


@pytest.mark.parametrize(
    ("height", "width", "chunk"), [(1, 7000, 1000), (3, 10001, 4096), (7001, 2, 999), (37, 1000, 64)]
)
def test_chunked_upsampling_equals_torchs_bilinear(height, width, chunk):
    from winclip_cli.jobs.maps import upsample_grid_in_chunks, upsample_grid_tensor

    grid = torch.rand(15, 15, generator=torch.Generator().manual_seed(height))
    chunked = upsample_grid_in_chunks(grid.numpy(), height, width, chunk)
    assert np.abs(chunked - upsample_grid_tensor(grid, height, width).numpy()).max() < 1e-6


def test_a_strip_is_upsampled_in_bounded_memory():
    """torch's bilinear kernel keeps indices and weights per output column: 1 x 20,000,000 took 0.5 GB
    on top of the 80 MB map; the chunked path stays near the map itself."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from winclip_cli.jobs.maps import upsample_grid\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = upsample_grid(torch.rand(15, 15), 1, 20_000_000)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, m.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    grown_mb, shape = out.stdout.split(maxsplit=1)
    assert shape.strip() == "(1, 20000000)"
    assert int(grown_mb) < 250, out.stdout  # the map is 80 MB
