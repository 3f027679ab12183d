"""Hardening round 2 (issue 21): root jobs against a second local user who can write into OUT, the cache or
the input folder. Each test reproduces one attack of the issue, as that user would run it (a child process
with another uid, or a thread planting links and FIFOs in the window the code would leave), and checks that
nothing outside OUT or the cache was created, changed or read, and that no command hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import invoke, run_cli

NOBODY = 65534


def make_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 48)) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="PNG")


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int, int]]:
    """Every entry under ``root`` (links not followed): kind, content, mode and mtime."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            info = path.lstat()
            kind = "link" if path.is_symlink() else "file" if path.is_file() else "dir"
            content = os.readlink(path).encode() if kind == "link" else path.read_bytes() if kind == "file" else b""
            found[str(path.relative_to(root))] = (kind, content, info.st_mode, info.st_mtime_ns)
    return found


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    from winclip_cli.io.outputs import read_results_csv

    return {row["path"]: row for row in read_results_csv(out / "scores.csv")}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    root = tmp_path / "outside"
    (root / "folder").mkdir(parents=True)
    (root / "secret.txt").write_text("SECRET-CONTENT do not print or truncate\n")
    (root / "folder" / "keep.txt").write_text("keep me\n")
    return root


@pytest.fixture
def shared(tmp_path: Path):
    """A folder every local user can reach and write in (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="winclip-shared-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_other_user(action) -> str:
    """``action()`` run as another local user (the tests run as root, as cron jobs do), in a forked child;
    what it returned, or the exception it raised, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = str(action())
        except BaseException as err:
            result = f"{type(err).__name__}: {err}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read().decode()
    os.waitpid(pid, 0)
    return text


class Planter(threading.Thread):
    """A local user's loop: replace every temporary file that appears in ``folders`` by a link to ``target``."""

    def __init__(self, folders: list[Path], target: Path) -> None:
        super().__init__(daemon=True)
        self.folders, self.target = folders, target
        self.stop = threading.Event()
        self.planted = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for folder in self.folders:
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                for name in names:
                    if name.endswith(".tmp") and not os.path.islink(folder / name):
                        try:
                            os.unlink(folder / name)
                            os.symlink(self.target, folder / name)
                            self.planted += 1
                        except OSError:
                            pass


# ==================================================================== 1. writes through a racing link


def test_atomic_writes_never_follow_a_link_planted_at_the_temporary(tmp_path, outside):
    from winclip_cli.io.outputs import write_png_atomic, write_text_atomic

    out = tmp_path / "out"
    (out / "heatmaps").mkdir(parents=True)
    before = snapshot(outside)
    planter = Planter([out, out / "heatmaps"], outside / "secret.txt")
    planter.start()
    written = failed = 0
    rgb = np.zeros((64, 64, 3), np.uint8)
    try:
        for i in range(300):
            try:
                write_text_atomic(out / "run.json", "x" * 100_000)
                write_png_atomic(out / "heatmaps" / f"{i}.png", rgb)
                written += 1
            except OSError:
                failed += 1  # the planted link was seen and the write refused: never written through
    finally:
        planter.stop.set()
        planter.join()
    assert planter.planted > 0 and written > 0
    assert snapshot(outside) == before
    for path in [out / "run.json", *(out / "heatmaps").glob("*.png")]:
        if not path.is_symlink():
            assert path.is_file()


def test_merge_never_writes_through_a_planted_link_nor_copies_setuid(tmp_path, tiny_args, outside):
    images = tmp_path / "images"
    make_images(images, ["a.png", "b.png"])
    shard, out = tmp_path / "shard", tmp_path / "merged"
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    heatmap = shard / "heatmaps" / "a.png.png"
    heatmap.chmod(0o4755)  # a setuid file must not be reproduced by a root merge
    (out / "heatmaps").mkdir(parents=True)
    # the old fixed temporary name, and every temporary that appears, planted as links outside
    (out / "heatmaps" / ".a.png.png.merge.tmp").symlink_to(outside / "secret.txt")
    before = snapshot(outside)
    planter = Planter([out, out / "heatmaps", out / "thumbs"], outside / "secret.txt")
    planter.start()
    try:
        result = invoke(["merge", shard, "--out", out])
    finally:
        planter.stop.set()
        planter.join()
    assert snapshot(outside) == before
    assert result.exit_code in (0, 2), result.output
    if (out / "heatmaps" / "a.png.png").exists() and not (out / "heatmaps" / "a.png.png").is_symlink():
        assert not (out / "heatmaps" / "a.png.png").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    # without the planter the merge completes, copies without the setuid bit and links the rest
    shutil.rmtree(out)
    assert invoke(["merge", shard, "--out", out]).exit_code == 0
    copied = (out / "heatmaps" / "a.png.png").stat()
    assert copied.st_ino != heatmap.stat().st_ino and not copied.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o111)
    assert (out / "heatmaps" / "a.png.png").read_bytes() == heatmap.read_bytes()
    assert (out / "heatmaps" / "b.png.png").stat().st_ino == (shard / "heatmaps" / "b.png.png").stat().st_ino


# ==================================================================== 2. the cache follows no link


def test_a_linked_text_cache_folder_is_never_written_through(tmp_path, tiny_args, outside, monkeypatch):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    cache = out / ".cache"  # the README's container recipe: the cache inside the output volume
    cache.mkdir(parents=True)
    monkeypatch.setenv("WINCLIP_CACHE_DIR", str(cache))
    (cache / "text").symlink_to(outside / "folder")
    (cache / "sha256").symlink_to(outside / "folder")
    before = snapshot(outside)
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 0, result.output
    assert snapshot(outside) == before
    assert (cache / "text").is_symlink()


def test_text_cache_entries_are_private(tmp_path, tiny_args, monkeypatch):
    images, out, cache = tmp_path / "images", tmp_path / "out", tmp_path / "cache"
    make_images(images, ["a.png"])
    monkeypatch.setenv("WINCLIP_CACHE_DIR", str(cache))
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    assert stat.S_IMODE((cache / "text").stat().st_mode) == 0o700
    entries = list((cache / "text").iterdir())
    assert len(entries) == 1 and stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert not (cache / "sha256").exists()  # no (path, size, mtime) memo any more


# ==================================================================== 3. clean-up never through a link


def test_clean_up_never_deletes_through_a_link_inside_out(tmp_path, tiny_args):
    data = tmp_path / "data"  # --out is the input folder itself
    make_images(data, ["sub/a.png", "top.png"])
    assert invoke(["scan", data, "--out", data, "-q", *tiny_args]).exit_code == 0
    (data / "keep").mkdir()
    (data / "keep" / "a.png.png").write_bytes(b"the user's own file")
    shutil.rmtree(data / "heatmaps" / "sub")
    (data / "heatmaps" / "sub").symlink_to("../keep")
    (data / "sub" / "a.png").unlink()  # vanished: its outputs are cleaned up
    for incremental in ([], ["--incremental"]):
        result = invoke(["scan", data, "--out", data, "-q", *incremental, *tiny_args])
        assert result.exit_code in (0, 3), result.output
        assert (data / "keep" / "a.png.png").read_bytes() == b"the user's own file"


def test_remove_inside_removes_only_regular_files(tmp_path, outside):
    from winclip_cli.io.outputs import remove_inside

    out = tmp_path / "out"
    (out / "heatmaps" / "real").mkdir(parents=True)
    (out / "heatmaps" / "real" / "x.png").write_bytes(b"mine")
    (out / "heatmaps" / "real" / "link.png").symlink_to(outside / "secret.txt")
    (out / "heatmaps" / "linked").symlink_to(outside / "folder")
    before = snapshot(outside)
    remove_inside(out, "heatmaps/linked/keep.txt")
    remove_inside(out, "heatmaps/real/link.png")
    remove_inside(out, "heatmaps/real/x.png")
    assert snapshot(outside) == before
    assert not (out / "heatmaps" / "real" / "x.png").exists()
    assert (out / "heatmaps" / "real" / "link.png").is_symlink()


# ==================================================================== 4. weights identity by content


def test_a_same_size_checkpoint_copied_with_cp_p_is_a_new_model(tmp_path, tiny_args, tiny_model_files):
    import torch

    config, checkpoint = tiny_model_files
    weights = tmp_path / "weights.pt"
    torch.save(torch.load(checkpoint, weights_only=True), weights)
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png", "b.png"])
    args = ["--model", config, "--weights", weights, "--device", "cpu"]
    assert invoke(["scan", images, "--out", out, "-q", *args]).exit_code == 0
    first = json.loads((out / "run.json").read_text())
    old_rows = rows_of(out)
    # a "retrained" checkpoint of the same size, put in place with the old mtime (cp -p)
    state = torch.load(weights, weights_only=True)
    state["text_projection"] = state["text_projection"].flip(1).contiguous()
    retrained = tmp_path / "retrained" / "weights.pt"  # saved the same way, same name inside the zip
    retrained.parent.mkdir()
    torch.save(state, retrained)
    assert retrained.stat().st_size == weights.stat().st_size
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(retrained.read_bytes())
    os.utime(weights, ns=(mtime, mtime))
    result = invoke(["scan", images, "--out", out, "-q", "--incremental", *args])
    assert result.exit_code == 0, result.output
    second = json.loads((out / "run.json").read_text())
    assert second["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() != first["weights_sha256"]
    assert second["unchanged"] == 0
    assert rows_of(out)["a.png"]["score"] != old_rows["a.png"]["score"]


# ==================================================================== 5. the text cache is verified


def test_text_cache_is_keyed_by_the_config_content_and_verifies_entries(tmp_path, tiny_backbone):
    from winclip_cli.core.prompts import DEFAULT_VOCABULARY
    from winclip_cli.core.text import TextEmbeddingCache, ensemble_embeddings

    backbone = tiny_backbone
    ensemble = DEFAULT_VOCABULARY.ensemble("screw")
    cache = TextEmbeddingCache(tmp_path / "text")
    identity = backbone.identity
    other = {**identity, "model_config_sha256": "0" * 64}  # same name, another config
    assert cache.key(identity, ensemble) != cache.key(other, ensemble)
    args = (backbone.model, backbone.tokenizer, ensemble, identity, backbone.device)
    first = cache.get_or_compute(*args)
    assert cache.encoder_calls == 1
    assert torch_equal(cache.get_or_compute(*args), first) and cache.encoder_calls == 1
    key = cache.key(identity, ensemble)
    entry = cache.path(key)

    def rewrite(embeddings: np.ndarray, checksum: str | None = None) -> None:
        checksum = checksum or hashlib.sha256(np.ascontiguousarray(embeddings).tobytes()).hexdigest()
        with open(entry, "wb") as handle:
            np.savez(handle, key=np.array(key), embeddings=embeddings, sha256=np.array(checksum))
        entry.chmod(0o600)

    good = first.numpy()
    stored_checksum = hashlib.sha256(good.tobytes()).hexdigest()
    cases = [
        (good[::-1].copy(), stored_checksum),  # the two vectors swapped: every score would be inverted
        (np.ones((2, 5), np.float32), None),  # another width: used to make every scan exit 2
        (good.astype(np.float64), None),
        (np.full_like(good, np.nan), None),
    ]
    for calls, (embeddings, checksum) in enumerate(cases, start=2):
        rewrite(embeddings, checksum)
        rebuilt = cache.get_or_compute(*args)
        assert cache.encoder_calls == calls  # a bad entry is a miss ...
        assert torch_equal(rebuilt, first)
        assert cache.load(key, good.shape[1]) is not None  # ... and is rebuilt
    rewrite(good)
    entry.chmod(0o666)  # an entry others could have written is not trusted
    cache.get_or_compute(*args)
    assert cache.encoder_calls == len(cases) + 2
    assert torch_equal(ensemble_embeddings(backbone.model, backbone.tokenizer, ensemble, backbone.device), first)


def torch_equal(a, b) -> bool:
    return bool((a.cpu() == b.cpu()).all())


def test_two_configs_of_one_name_are_two_models(tmp_path, tiny_model_files):
    config, checkpoint = tiny_model_files
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    other = tmp_path / "other" / config.name
    other.parent.mkdir()
    cfg = json.loads(config.read_text())
    cfg["quick_gelu"] = True
    other.write_text(json.dumps(cfg))
    runs = []
    for model in (config, other):
        args = ["--model", model, "--weights", checkpoint, "--device", "cpu"]
        result = invoke(["scan", images, "--out", out, "-q", "--incremental", *args])
        assert result.exit_code == 0, result.output
        runs.append(json.loads((out / "run.json").read_text()))
    assert runs[0]["architecture"] == runs[1]["architecture"]
    assert runs[0]["model_config_sha256"] != runs[1]["model_config_sha256"]
    assert runs[1]["unchanged"] == 0  # --incremental rescored: another model


# ==================================================================== 6. FIFOs never hang a command


def test_decode_file_hashes_what_it_decoded_even_if_a_fifo_is_swapped_in(tmp_path, monkeypatch):
    from winclip_cli.io import images as images_module
    from winclip_cli.jobs import decode

    make_images(tmp_path, ["a.png"])
    path = tmp_path / "a.png"
    content = path.read_bytes()
    real_decode = images_module._decode

    def decode_then_swap(handle, max_pixels):
        image = real_decode(handle, max_pixels)
        path.unlink()
        os.mkfifo(path)  # a local user swaps the file for a FIFO between decoding and hashing
        return image

    monkeypatch.setattr(images_module, "_decode", decode_then_swap)
    prep = decode.Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")
    done: list = []
    worker = threading.Thread(target=lambda: done.append(decode.decode_file(path, "a.png", prep)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "decode_file blocked on a FIFO"
    assert done[0].error == "" and done[0].stamp.sha256 == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("planted", ["fifo", "link-to-fifo"])
def test_a_fifo_lock_is_refused_at_once(tmp_path, tiny_args, planted):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    (out / ".winclip").mkdir(parents=True)
    if planted == "fifo":
        os.mkfifo(out / ".winclip" / "lock")
    else:
        os.mkfifo(tmp_path / "fifo")
        (out / ".winclip" / "lock").symlink_to(tmp_path / "fifo")
    for command in (["scan", images, "--out", out, *tiny_args], ["watch", images, "--out", out, *tiny_args]):
        result = run_cli(command, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "lock" in result.stderr and "Traceback" not in result.stderr


def test_a_fifo_run_json_or_scores_csv_hangs_neither_merge_nor_report(tmp_path, tiny_args):
    images, shard = tmp_path / "images", tmp_path / "shard"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    (shard / "run.json").unlink()
    os.mkfifo(shard / "run.json")
    merged = run_cli(["merge", shard, "--out", tmp_path / "merged"], timeout=120)
    assert merged.returncode == 2 and "not a regular file" in merged.stderr, merged.stderr
    report = run_cli(["report", shard], timeout=120)
    assert report.returncode == 0, report.stderr
    assert "run.json could not be read" in (shard / "report.html").read_text()
    (shard / "scores.csv").unlink()
    os.mkfifo(shard / "scores.csv")
    report = run_cli(["report", shard], timeout=120)
    assert report.returncode == 2 and "Traceback" not in report.stderr, report.stderr


@pytest.mark.parametrize("option", ["--calibration", "--refs", "--prompts", "--model"])
def test_a_fifo_named_as_an_input_file_is_refused_at_once(tmp_path, tiny_args, option):
    images = tmp_path / "images"
    make_images(images, ["a.png"])
    fifo = tmp_path / ("fifo.json" if option == "--model" else "fifo")
    os.mkfifo(fifo)
    args = list(tiny_args)
    if option == "--model":  # the FIFO in place of the tiny model's config
        args[args.index("--model") : args.index("--model") + 2] = []
    result = run_cli(["scan", images, "--out", tmp_path / "out", option, fifo, *args], timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


# ==================================================================== 7. the lock cannot be held by others


def test_another_user_cannot_hold_the_lock(shared, tiny_args):
    images, out = shared / "images", shared / "out"
    make_images(images, ["a.png"])
    out.mkdir()
    out.chmod(0o1777)  # the second user can write into OUT (with the sticky bit: see the audit tests below)
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    lock = out / ".winclip" / "lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / ".winclip").stat().st_mode) == 0o700

    def hold_lock() -> str:
        import fcntl

        with open(lock) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return "HELD"

    attempt = as_other_user(hold_lock)
    assert attempt.startswith("PermissionError"), attempt
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0


def test_a_lock_held_by_another_user_since_an_older_version_is_said_not_skipped(shared, tiny_args):
    images, out = shared / "images", shared / "out"
    make_images(images, ["a.png"])
    (out / ".winclip").mkdir(parents=True)
    (out / ".winclip").chmod(0o755)  # what older versions left: a lock every user could open
    lock = out / ".winclip" / "lock"
    lock.write_text("")
    lock.chmod(0o644)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the second user, holding the lock until killed
        import fcntl

        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            handle = open(lock)
            fcntl.flock(handle, fcntl.LOCK_SH)
            os.write(ready_write, b"held")
            time.sleep(600)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 4) == b"held"
        result = run_cli(["scan", images, "--out", out, *tiny_args], timeout=120)
        assert result.returncode == 2, result.stderr  # not the exit 4 that the README's cron line skips
        assert f"held by another user (uid {NOBODY}, pid {pid})" in result.stderr
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600  # and no other user can open it from now on


def test_a_state_folder_of_another_user_is_refused(shared, tiny_args):
    images, out = shared / "images", shared / "out"
    make_images(images, ["a.png"])
    out.mkdir()
    out.chmod(0o1777)
    made = as_other_user(lambda: os.mkdir(out / ".winclip", 0o777))
    assert made == "None", made
    result = invoke(["scan", images, "--out", out, *tiny_args])
    assert result.exit_code == 2 and "belongs to another user" in result.stderr


def test_a_busy_message_shows_only_the_parsed_holder(tmp_path, tiny_args):
    import fcntl

    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    lock = out / ".winclip" / "lock"
    with open(lock, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("\x1b]0;owned\x07\x1b[2J pid 1 on host\n")
        handle.flush()
        result = run_cli(["scan", images, "--out", out, *tiny_args], timeout=120)
    assert result.returncode == 4
    assert "unreadable lock" in result.stderr and "\x1b" not in result.stderr and "owned" not in result.stderr


# ==================================================================== 8. hooks: lost alerts, then a hang


def test_a_name_that_is_not_utf8_does_not_stop_later_alerts(tmp_path):
    from winclip_cli.io.outputs import ResultRow
    from winclip_cli.jobs.watch import AnomalyHook

    received = tmp_path / "received"
    warnings: list[str] = []

    class Reporter:
        def warn(self, message: str) -> None:
            warnings.append(message)

    hook = AnomalyHook(f"cat >> {received}", timeout=20, reporter=Reporter())
    for name in ["bad\udcff.png", "good.png"]:
        hook.submit(ResultRow(path=name, status="ok", score=0.9, label="anomalous"))
    hook.close(wait=30)
    lines = [json.loads(line) for line in received.read_text(encoding="utf-8").splitlines()]
    assert [line["path"] for line in lines] == ["bad\\xff.png", "good.png"]
    assert warnings == []


def test_a_full_hook_queue_never_blocks_close_and_says_what_was_dropped(tmp_path):
    from winclip_cli.io.outputs import ResultRow
    from winclip_cli.jobs.watch import AnomalyHook

    warnings: list[str] = []

    class Reporter:
        def warn(self, message: str) -> None:
            warnings.append(message)

    hook = AnomalyHook("sleep 5", timeout=20, reporter=Reporter(), max_waiting=3)
    for i in range(10):
        hook.submit(ResultRow(path=f"{i}.png", status="ok", score=0.9, label="anomalous"))
    started = time.monotonic()
    hook.close(wait=0.5)
    assert time.monotonic() - started < 3
    assert hook.dropped >= 6
    assert any("not sent, too many hooks waiting" in w for w in warnings)
    assert any("stopping with about" in w for w in warnings)


def test_a_hook_printing_a_lot_is_not_buffered(tmp_path):
    import resource

    from winclip_cli.io.outputs import ResultRow
    from winclip_cli.jobs.watch import run_hook

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = ResultRow(path="a.png", status="ok", score=0.9, label="anomalous")
    command = "head -c 400000000 /dev/zero; head -c 400000000 /dev/zero >&2; echo last words >&2; exit 3"
    assert run_hook(command, row, timeout=120) == "exit code 3: last words"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


def test_json_lines_under_a_strict_utf8_locale_with_a_name_that_is_not_utf8(tmp_path, tiny_args):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    os.rename(images / "a.png", os.fsencode(images) + b"/\xff.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIO", "PYTHONUTF8"))}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    result = run_cli(["scan", images, "--out", out, "--json", "-q", *tiny_args], env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["path"] == "\\xff.png"


# ==================================================================== 9. links in the input


@pytest.fixture
def private_image(tmp_path: Path) -> Path:
    """A mode-700 folder of root holding an image nobody else may see."""
    folder = tmp_path / "private"
    make_images(folder, ["secret.png"])
    folder.chmod(0o700)
    return folder


def plant_link(link: Path, target: Path) -> None:
    """A link made by the second user (os.lchown gives it their uid, as if they had made it)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


def test_links_of_another_user_in_the_input_are_not_followed(tmp_path, tiny_args, private_image):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    plant_link(images / "linked", private_image)
    plant_link(images / "stolen.png", private_image / "secret.png")
    result = invoke(["scan", images, "--out", out, *tiny_args])
    assert result.exit_code == 3, result.output
    rows = rows_of(out)
    assert set(rows) == {"a.png", "stolen.png"}
    assert rows["stolen.png"]["status"] == "error" and "belongs to uid 65534" in rows["stolen.png"]["error"]
    assert "not followed" in result.stderr
    written = [p.name for p in out.rglob("*") if "secret" in p.name or "stolen" in p.name]
    assert written == []
    # a link of the user running winclip is followed as before
    (images / "own").symlink_to(private_image)
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert rows_of(out)["own/secret.png"]["status"] == "ok"


def test_a_folder_swapped_for_a_link_after_discovery_is_not_read(tmp_path, private_image):
    from winclip_cli.io.images import discover_images
    from winclip_cli.jobs import decode

    images = tmp_path / "images"
    make_images(images, ["sub/secret.png"])
    (found,) = discover_images(images).files
    shutil.rmtree(images / "sub")
    plant_link(images / "sub", private_image)  # mid-watch: the sub-folder is now another user's link
    prep = decode.Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    decoded = decode.decode_file(found, "sub/secret.png", prep)
    assert decoded.image is None and "belongs to uid 65534" in decoded.error


# ==================================================================== 10. only the formats winclip writes


def test_report_opens_heatmaps_only_as_png_or_jpeg(tmp_path, tiny_args, monkeypatch):
    from PIL import EpsImagePlugin

    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    heatmap = out / rows_of(out)["a.png"]["heatmap"]
    heatmap.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    for thumb in (out / "thumbs").rglob("*.heat.jpg"):
        thumb.unlink()
    opened: list[str] = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append("eps"))
    result = invoke(["report", out])
    assert result.exit_code == 0, result.output
    assert opened == []


# ==================================================================== 11. merge takes OUT's lock


def test_merge_into_a_folder_being_written_exits_busy(tmp_path, tiny_args):
    from winclip_cli.io.state import OutputLock

    images, shard, out = tmp_path / "images", tmp_path / "shard", tmp_path / "out"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    out.mkdir()
    with OutputLock(out):  # a scan or watch (or a second merge) writing there
        result = invoke(["merge", shard, "--out", out])
    assert result.exit_code == 4, result.output
    assert not (out / "scores.csv").exists()
    assert invoke(["merge", shard, "--out", out]).exit_code == 0


# ==================================================================== 12. bounded inputs


def test_a_prompt_file_with_too_many_sentences_is_refused_clearly(tmp_path):
    from winclip_cli.core.prompts import MAX_SENTENCES, load_vocabulary
    from winclip_cli.errors import PromptFileError

    states = [f"{{}} state {i}" for i in range(200)]
    templates = [f"a photo {i} of the {{}}." for i in range(MAX_SENTENCES // 200 + 10)]
    path = tmp_path / "big.toml"
    path.write_text(f"mode = 'replace'\nnormal = {json.dumps(states)}\nanomalous = {json.dumps(states[:2])}\n"
                    f"templates = {json.dumps(templates)}\n")  # fmt: skip
    with pytest.raises(PromptFileError, match="normal states x .* templates make .* sentences"):
        load_vocabulary(path)
    nested = tmp_path / "nested.toml"
    nested.write_text("normal = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PromptFileError, match="invalid TOML"):
        load_vocabulary(nested)


def test_long_prompt_lists_are_encoded_in_bounded_batches(tiny_backbone, monkeypatch):
    from winclip_cli.core import text

    backbone = tiny_backbone
    sentences = [f"a photo of a screw number {i}." for i in range(1200)]
    sizes: list[int] = []
    real = text.encode_sentences

    def recording(model, tokenizer, batch, device):
        sizes.append(len(batch))
        return real(model, tokenizer, batch, device)

    whole = real(backbone.model, backbone.tokenizer, sentences, backbone.device).double().mean(dim=0).float()
    monkeypatch.setattr(text, "encode_sentences", recording)
    mean = text.mean_embedding(backbone.model, backbone.tokenizer, sentences, backbone.device)
    assert max(sizes) <= text.TEXT_BATCH and sum(sizes) == 1200
    assert np.allclose(mean.numpy(), whole.numpy(), rtol=0, atol=1e-6)


def test_an_absurd_model_config_is_refused_before_building(tmp_path, tiny_model_files):
    config, checkpoint = tiny_model_files
    cfg = json.loads(config.read_text())
    cfg["text_cfg"]["layers"] = 10_000_000
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps(cfg))
    started = time.monotonic()
    make_images(tmp_path / "images", ["a.png"])
    result = invoke(["scan", tmp_path / "images", "--out", tmp_path / "out", "--model", huge, "--weights", checkpoint])
    assert result.exit_code == 2 and "larger than any CLIP model" in result.stderr
    assert time.monotonic() - started < 30


def test_long_notes_are_capped_and_long_fields_read_back(tmp_path):
    from winclip_cli.io.outputs import NOTE_LIMIT, ResultRow, read_results_csv, write_results_csv_atomic

    row = ResultRow(path="x" * 200_000, status="ok", note="bad tag; " * 50_000)
    assert len(row.note) <= NOTE_LIMIT
    write_results_csv_atomic(tmp_path / "scores.csv", [row])
    (back,) = read_results_csv(tmp_path / "scores.csv")
    assert back["path"] == row.path and back["note"] == row.note


# ==================================================================== 13. small wrong results and messages


@pytest.mark.parametrize(("size", "orientation"), [((40, 1), 6), ((1, 40), 2), ((40, 1), 2), ((1, 40), 8)])
def test_thin_images_with_exif_flips_are_scored(tmp_path, size, orientation):
    from winclip_cli.io.images import load_image, preprocess

    path = tmp_path / "thin.jpg"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert all(step > 0 for step in loaded.rgb.strides)
    assert preprocess(loaded, (32, 32), (0.5,) * 3, (0.5,) * 3).shape == (3, 32, 32)


def test_merge_with_odd_shard_fields_and_missing_heatmaps(tmp_path, tiny_args):
    images, shard, out = tmp_path / "images", tmp_path / "shard", tmp_path / "out"
    make_images(images, ["a.png", "b.png"])
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    run = json.loads((shard / "run.json").read_text())
    run["shard"] = "a/b"
    (shard / "run.json").write_text(json.dumps(run))
    (shard / "heatmaps" / "b.png.png").unlink()
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / ".a.png.png.0123456789abcdef.tmp").write_bytes(b"left by a killed merge")
    result = invoke(["merge", shard, "--out", out])
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert rows["b.png"]["heatmap"] == "" and rows["a.png"]["heatmap"] == "heatmaps/a.png.png"
    assert (out / "heatmaps" / "a.png.png").is_file()
    assert not list((out / "heatmaps").glob("*.tmp"))


def test_the_weights_error_never_advises_unpickling(tmp_path, tiny_model_files):
    import torch

    config, _ = tiny_model_files
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"x": object()}}, hostile)
    make_images(tmp_path / "images", ["a.png"])
    result = invoke(["scan", tmp_path / "images", "--out", tmp_path / "out", "--model", config, "--weights", hostile])
    assert result.exit_code != 0
    assert "weights_only" not in result.output and "unpickl" in result.output


def test_an_apng_claiming_billions_of_frames_is_said_as_a_claim():
    from winclip_cli.io.images import _frame_note

    class Claiming:
        n_frames = 2147483647
        format = "PNG"

        def tell(self) -> int:
            return 0

    assert _frame_note(Claiming()) == "first frame (the file claims 2147483647 frames)"


def test_a_sigterm_storm_does_not_end_a_stopping_command_with_143(tmp_path):
    code = (
        "import os, signal, time\n"
        "from winclip_cli.cli.app import StopFlag\n"
        "flag = StopFlag()\n"
        "with flag.installed():\n"
        "    for _ in range(50):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert flag.requested\n"
        "for _ in range(50):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "print('clean exit')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "clean exit" in result.stdout, result.stderr


# ------------------------------------------------------------------------------------------------------------
# Audit of round 2 (issue 21): attacks that still worked after the round-2 fixes.


def test_an_out_writable_by_all_without_sticky_bit_is_refused_and_nothing_outside_is_touched(
    shared, tiny_args, outside
):
    """F1/F2: whoever may write in OUT could rename root's OUT/.winclip and put a link in its place; SQLite
    opens its files by name, so its -wal was created (and a damaged state set aside) through the link."""
    images, out = shared / "images", shared / "out"
    make_images(images, ["a.png"])
    out.mkdir()
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    out.chmod(0o777)
    before = snapshot(outside)

    def swap_state_folder() -> str:
        os.rename(out / ".winclip", out / "moved")
        os.symlink(outside / "folder", out / ".winclip")
        return "SWAPPED"

    assert as_other_user(swap_state_folder) == "SWAPPED"
    result = run_cli(["scan", images, "--out", out, *tiny_args], timeout=120)
    assert result.returncode == 2, result.stderr  # (a link that stays is seen; one swapped in later is not)
    assert snapshot(outside) == before
    # so the rule is about OUT, not about what is in it at the moment of a check
    (out / ".winclip").unlink()
    (out / "moved").rename(out / ".winclip")
    result = run_cli(["scan", images, "--out", out, *tiny_args], timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{out} is writable by every user without the sticky bit" in result.stderr
    assert f"chmod o-w {out}" in result.stderr and f"chmod +t {out}" in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(outside) == before
    # the sticky bit: the second user may write in OUT, not rename root's entries, and the lock holds
    out.chmod(0o1777)
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    moved = as_other_user(lambda: os.rename(out / ".winclip", out / "moved"))
    assert moved.startswith("PermissionError"), moved
    with __import__("winclip_cli.io.state", fromlist=["OutputLock"]).OutputLock(out):
        busy = run_cli(["scan", images, "--out", out, *tiny_args], timeout=120)  # another process
    assert busy.returncode == 4, busy.stderr


def test_an_out_of_another_user_is_refused(shared, tiny_args):
    images, out = shared / "images", shared / "out"
    make_images(images, ["a.png"])
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    result = invoke(["scan", images, "--out", out, *tiny_args])
    assert result.exit_code == 2
    assert f"{out} belongs to another user (uid {NOBODY})" in result.stderr and "chown" in result.stderr
    assert not (out / ".winclip").exists()


def test_a_damaged_state_is_set_aside_inside_the_state_folder(tmp_path, tiny_args):
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    (out / ".winclip" / "state.sqlite").write_bytes(b"not a database" * 100)
    (out / ".winclip" / "state.sqlite-wal").write_bytes(b"junk")
    result = invoke(["scan", images, "--out", out, "-q", *tiny_args])
    assert result.exit_code == 0, result.stderr
    aside = sorted(p.name for p in (out / ".winclip").iterdir() if p.name.startswith("state.corrupt-"))
    assert len(aside) == 1 and (out / ".winclip" / aside[0]).read_bytes() == b"not a database" * 100
    assert rows_of(out)["a.png"]["status"] == "ok"


def test_a_text_cache_folder_writable_by_all_is_not_used(tmp_path, tiny_backbone, monkeypatch):
    from winclip_cli.core.text import TextEmbeddingCache

    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    cache_root.chmod(0o777)  # another user could rename cache/text and put a link in its place
    cache = TextEmbeddingCache(cache_root / "text")
    cache.store("k" * 64, __import__("torch").ones(2, 4))
    assert not (cache_root / "text").exists()
    cache_root.chmod(0o1777)
    cache.store("k" * 64, __import__("torch").ones(2, 4))
    assert (cache_root / "text" / f"{'k' * 64}.npz").is_file()
    assert cache.load("k" * 64, 4) is not None
    cache_root.chmod(0o777)
    assert cache.load("k" * 64, 4) is None


def test_merge_copies_files_another_user_owns_rather_than_linking_them(shared, tiny_args):
    """F3: a hard link to a shard file of another user made it part of root's merged output: that user could
    rewrite the merged heatmap (or thumbnail) at any time afterwards, through the shard's name."""
    images, shard, out = shared / "images", shared / "shard", shared / "merged"
    make_images(images, ["a.png", "b.png"])
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    foreign = shard / "heatmaps" / "a.png.png"
    os.chown(foreign, NOBODY, NOBODY)
    twice = shard / "heatmaps" / "b.png.png"
    os.link(twice, shared / "b-second-name.png")  # a file with another name somewhere: not linked either
    assert invoke(["merge", shard, "--out", out]).exit_code == 0
    merged = out / "heatmaps" / "a.png.png"
    assert merged.stat().st_ino != foreign.stat().st_ino and merged.stat().st_uid == os.geteuid()
    assert merged.read_bytes() == foreign.read_bytes()
    assert (out / "heatmaps" / "b.png.png").stat().st_ino != twice.stat().st_ino
    written = as_other_user(lambda: foreign.write_bytes(b"REWRITTEN"))
    assert written == str(len(b"REWRITTEN")), written
    assert merged.read_bytes() != b"REWRITTEN"


class Flipper(threading.Thread):
    """A local user's loop: ``path`` is a regular file one moment and a FIFO the next."""

    def __init__(self, path: Path, content: bytes) -> None:
        super().__init__(daemon=True)
        self.path, self.content = path, content
        self.stop = threading.Event()

    def run(self) -> None:
        spare = self.path.with_name(self.path.name + ".spare")
        while not self.stop.is_set():
            try:
                spare.write_bytes(self.content)
                os.replace(spare, self.path)
                os.mkfifo(spare)
                os.replace(spare, self.path)
            except OSError:
                pass


def test_preflight_never_hangs_on_a_fifo_swapped_in_for_a_memory_or_model_config(tmp_path):
    """F4: the memory and model-config checks tested a name (is_file) and then opened it blocking: a FIFO
    swapped in between hung the command for ever."""
    memory, config = tmp_path / "refs.npz", tmp_path / "model.json"
    flippers = [Flipper(memory, b"PK\x03\x04" + b"0" * 100), Flipper(config, b'{"vision_cfg": {"image_size": 32}}')]
    for flipper in flippers:
        flipper.start()
    code = (
        "import sys; from pathlib import Path\n"
        "from winclip_cli.io.checks import check_memory_file\n"
        "from winclip_cli.errors import MemoryFileError\n"
        "from winclip_cli.options import model_input_size\n"
        "said = set()\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        check_memory_file(Path(sys.argv[1]))\n"
        "    except MemoryFileError as err:\n"
        "        said.add(str(err))\n"
        "    assert model_input_size(sys.argv[2]) in (None, (32, 32))\n"
        "print(sorted(said))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(memory), str(config)], capture_output=True, text=True, timeout=120
        )
    finally:
        for flipper in flippers:
            flipper.stop.set()
            flipper.join()
    assert done.returncode == 0, done.stderr
    assert "not found" not in done.stdout, done.stdout  # a FIFO is said as one
    os.unlink(memory)
    os.mkfifo(memory)
    from winclip_cli.errors import MemoryFileError
    from winclip_cli.io.checks import check_memory_file

    with pytest.raises(MemoryFileError, match="is a FIFO, not a regular file"):
        check_memory_file(memory)


def test_file_names_never_put_terminal_escapes_or_lines_on_stderr(tmp_path, tiny_args):
    """F8: a file name holding an escape sequence (set the title, move the cursor) or a newline (a fake
    line) went to root's terminal as it was: only Rich markup was escaped."""
    images = tmp_path / "images"
    make_images(images, ["a.png"])
    name = "x\x1b]0;pwned\x07\x1b[2J\nwarning: all fine\x9b1m.png"
    (images / name).write_bytes(b"not an image")
    result = run_cli(["scan", images, "--out", tmp_path / "out", *tiny_args], timeout=120)
    assert result.returncode == 3, result.stderr  # one unreadable file
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\x9b" not in result.stderr
    warned = [line for line in result.stderr.splitlines() if "pwned" in line]
    assert len(warned) == 1 and "x\\x1b]0;pwned\\x07\\x1b[2J\\x0awarning: all fine\\x9b1m.png" in warned[0]
    assert not any(line.startswith("warning: all fine") for line in result.stderr.splitlines())


def test_a_hook_environment_never_holds_a_raw_newline_or_escape(tmp_path):
    """F9: WINCLIP_PATH carried a name's newline as it was: `mail -s "defect: $WINCLIP_PATH"` then took the
    rest of the name as extra mail headers (Bcc: ...)."""
    from winclip_cli.io.outputs import ResultRow
    from winclip_cli.jobs.watch import run_hook

    name = "cam/a\nBcc: attacker@example.com\x1b[2J.png"
    row = ResultRow(path=name, status="ok", score=0.9, label="anomalous", heatmap=f"heatmaps/{name}.png")
    seen, stdin = tmp_path / "env.txt", tmp_path / "stdin.json"
    command = f'printf "%s|%s" "$WINCLIP_PATH" "$WINCLIP_HEATMAP" > {seen}; cat > {stdin}'
    assert run_hook(command, row, timeout=30) == ""
    escaped = "cam/a\\x0aBcc: attacker@example.com\\x1b[2J.png"
    assert seen.read_text() == f"{escaped}|heatmaps/{escaped}.png"
    assert json.loads(stdin.read_text())["path"] == name  # the exact name, for a hook that needs it


def test_a_huge_scores_csv_is_refused_by_report_and_merge_in_one_line(tmp_path, tiny_args, monkeypatch):
    """F5: a crafted scores.csv of 146 MB took 2.3 GB of memory in report and merge (every row a dict in a
    list). Now read one row at a time, at most SCORES_CSV_BYTE_LIMIT bytes and a bounded number of rows."""
    from winclip_cli.io.outputs import SCORES_CSV_BYTE_LIMIT
    from winclip_cli.report import page

    images, shard = tmp_path / "images", tmp_path / "shard"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", shard, "-q", *tiny_args]).exit_code == 0
    scores = shard / "scores.csv"
    header, first = scores.read_text().splitlines()[:2]
    with open(scores, "a") as handle:
        handle.truncate(SCORES_CSV_BYTE_LIMIT + 1)  # sparse: costs no disk
    for command in (["report", shard], ["merge", shard, "--out", tmp_path / "merged"]):
        result = run_cli(command, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "larger than 512 MB, more than winclip reads" in result.stderr and result.stderr.count("\n") == 1
    # the row limit: a page of cards per row is bounded too
    rows = [first.replace("a.png", f"a{i}.png", 1) for i in range(12)]
    scores.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.setattr(page, "REPORT_ROW_LIMIT", 11)
    result = invoke(["report", shard])
    assert result.exit_code == 2 and "more than 11 rows, more than winclip reads" in result.stderr
    monkeypatch.setattr(page, "REPORT_ROW_LIMIT", 12)
    assert invoke(["report", shard]).exit_code == 0


def big_png(path: Path, width: int, height: int) -> None:
    """A valid RGB PNG of ``width`` x ``height`` black pixels, written a row at a time (a few hundred KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_report_never_decodes_a_giant_heatmap_for_a_thumbnail(tmp_path, tiny_args, monkeypatch):
    """F6: a 13000x13000 PNG put at a heatmap's name took 1.4 GB when report regenerated its thumbnail."""
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png", "b.png"])
    assert invoke(["scan", images, "--out", out, "-q", "--heatmaps", "png", *tiny_args]).exit_code == 0
    big_png(out / "heatmaps" / "a.png.png", 13000, 13000)
    shutil.rmtree(out / "thumbs")
    decoded: list[int] = []
    load = Image.Image.load

    def counting_load(self):
        decoded.append(self.width * self.height)
        return load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    result = invoke(["report", out])
    assert result.exit_code == 0, result.stderr
    assert decoded and max(decoded) < 13000 * 13000  # the giant was never decoded; b's heatmap was
    from winclip_cli.io.layout import thumbnail_relpaths

    assert (out / thumbnail_relpaths("b.png")[1]).is_file()
    assert not (out / thumbnail_relpaths("a.png")[1]).exists()  # that card shows less


def test_build_refs_and_calibrate_never_read_a_huge_non_image_whole(tmp_path, tiny_args):
    """F7: build-refs and calibrate --refs hashed every input in full before any image check: a 1 TB sparse
    file named x.png (a PNG signature, then nothing) kept them reading zeros for hours."""
    good, refs = tmp_path / "good", tmp_path / "refs.npz"
    make_images(good, ["a.png", "b.png"])
    huge = good / "x.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n")
    with open(huge, "r+b") as handle:
        handle.truncate(1 << 40)  # sparse: costs no disk
    built = run_cli(["build-refs", good, "--out", refs, *tiny_args], timeout=120)
    assert built.returncode == 3, built.stderr  # one reference could not be embedded, said on stderr
    assert "x.png" in built.stderr and refs.is_file()
    command = ["calibrate", good, "--refs", refs, "--class", "o", *tiny_args]
    calibrated = run_cli(command, timeout=120)
    assert "x.png" in calibrated.stderr and calibrated.returncode in (0, 3), calibrated.stderr
    assert "2 are references: scored leave-one-out" in calibrated.stderr


def test_scores_csv_with_another_name_is_never_appended_through(tmp_path, tiny_args, outside):
    """A scores.csv hard-linked to another file (made by someone else, or a backup's `cp -al`): the scan
    appended its rows through it, into the other name too. Now the name gets a copy of its own first."""
    images, out = tmp_path / "images", tmp_path / "out"
    make_images(images, ["a.png"])
    assert invoke(["scan", images, "--out", out, "-q", *tiny_args]).exit_code == 0
    other = outside / "other-name.csv"
    os.link(out / "scores.csv", other)
    before = other.read_bytes()
    make_images(images, ["b.png"])
    (out / ".winclip" / "state.sqlite").stat()  # the state is there: the scan appends b's row
    assert invoke(["scan", images, "--out", out, "-q", "--incremental", *tiny_args]).exit_code == 0
    assert other.read_bytes() == before and other.stat().st_nlink == 1
    assert set(rows_of(out)) == {"a.png", "b.png"}


def test_a_folder_at_a_written_name_is_said_by_that_name(tmp_path):
    from winclip_cli.io.safe_fs import atomic_write

    (tmp_path / "scores.csv").mkdir()
    with pytest.raises(IsADirectoryError) as raised, atomic_write(tmp_path / "scores.csv") as handle:
        handle.write(b"x")
    assert raised.value.filename == str(tmp_path / "scores.csv")
    assert os.listdir(tmp_path) == ["scores.csv"]  # no temporary left
