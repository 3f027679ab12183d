"""``winclip calibrate``: thresholds with a known false-alarm rate, from good parts alone.

Scores the normal images exactly as ``scan`` would (same model, vocabulary, memory and tiling);
an image that is itself a reference of the memory is scored with its own embeddings left out, so
the calibration sees it as an unseen good part. The thresholds are stored with their provenance
in the memory's metadata (with ``--refs``) or in a small JSON file.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from winclip_cli import __version__
from winclip_cli.core.calibration import Calibration, calibrate
from winclip_cli.errors import SetupError
from winclip_cli.io.hashing import sha256_file
from winclip_cli.io.memory import MemoryFile, load_memory, update_metadata
from winclip_cli.io.outputs import write_text_atomic
from winclip_cli.jobs.decode import Decoded, relative_name
from winclip_cli.jobs.kernel import InputProblems, Reporter, Session, discover
from winclip_cli.jobs.maps import full_resolution_map, image_score
from winclip_cli.jobs.record import calibration_record
from winclip_cli.options import DEFAULT_CALIBRATION_FILE, DEFAULT_FPR, MAX_DISTANCE
from winclip_cli.spec import InputSpec, ModelSpec, MutualSpec, TextSpec
from winclip_cli.wording import plural


@dataclass(frozen=True)
class CalibrateSpec:
    """``calibrate``: the good images, the rates, and where the calibration is stored: inside the
    memory ``refs`` (which also makes the scoring few-shot), else in the file ``out``."""

    good_dir: Path
    model: ModelSpec
    inputs: InputSpec
    text: TextSpec
    fpr: float = DEFAULT_FPR
    pixel_fpr: float | None = None
    refs: Path | None = None
    out: Path = DEFAULT_CALIBRATION_FILE  # used only without refs
    # --mode mutual: the good images scored against each other in pools, as `scan --mode mutual` pools
    # a folder; the threshold is taken on their raw scores (the map's maximum before RsCIN)
    mutual: MutualSpec | None = None

    @property
    def stored_in(self) -> Path:
        return self.refs if self.refs is not None else self.out


@dataclass
class CalibrateResult:
    calibration: Calibration
    scores: np.ndarray
    stored_in: Path
    left_out: int
    seconds: float
    problems: InputProblems  # unreadable good images and folders: the run is incomplete (exit 3)
    score_range: float = 1.0  # the largest score of the mode (mutual raw scores: distances up to 2)


PIXELS_PER_IMAGE = 65536


def pixel_sample(score_map: np.ndarray, limit: int = PIXELS_PER_IMAGE) -> np.ndarray:
    """Pixels of a full-resolution map (the same map `scan` measures areas on) for the pixel statistics.

    Large maps are thinned to a regular grid of about ``limit`` pixels to keep memory bounded; the
    map's maximum is always kept, so a threshold at false-positive rate 0 stays exact.
    """
    flat = score_map.ravel()
    if flat.size <= limit:
        return flat.copy()
    step = int(np.ceil(flat.size / limit))
    return np.append(flat[::step], flat.max())


def run_calibrate_job(options: CalibrateSpec, reporter: Reporter) -> CalibrateResult:
    started = time.perf_counter()
    problems = InputProblems()
    files = discover(options.good_dir, options.stored_in, reporter, problems.unlisted)
    if not files:
        raise SetupError(f"no images found under {options.good_dir}")
    memory: MemoryFile | None = load_memory(options.refs) if options.refs is not None else None
    session = Session.open(
        options.model, options.inputs, text=options.text, memory=memory, reporter=reporter, mutual=options.mutual
    )
    engine = session.engine
    assert engine is not None
    reference_of = memory.reference_index() if memory is not None else {}
    left_out = 0
    reference_index_of: dict[Path, int] = {}  # good image -> its index in the memory, when it is a reference

    def exclude_for(item: Decoded) -> int:
        return reference_index_of.get(item.path, -1)

    inputs = [(path, relative_name(path, options.good_dir)) for path in files]
    if memory is not None:
        # Hashed once here, before any scoring: the decoder then reads each file without hashing it again.
        for path, _ in inputs:
            if path.is_file():
                index = reference_of.get(sha256_file(path))
                if index is not None:
                    reference_index_of[path] = index
        left_out = len(reference_index_of)
        # only a memory of two or more references can leave one out and still compare with the others
        if left_out and memory.k < 2:
            raise SetupError(
                f"{options.refs} holds a single reference, which is also among the good images: leaving it out "
                "leaves nothing to compare with; calibrate on other good images or build a larger memory"
            )
    reporter.info(
        f"winclip {__version__}: calibrating on {plural(len(files), 'good image')}"
        + (f" ({left_out} are references: scored leave-one-out)" if left_out else "")
        + f", {session.describe()}"
    )
    reporter.start("calibrating", len(files))
    image_scores: list[float] = []
    pixel_scores: list[np.ndarray] = []
    if options.mutual is not None:
        from winclip_cli.jobs.mutual import MutualStream

        stream = MutualStream(session, reporter, int(options.mutual.pool_size))
        items = stream.scored(inputs, with_stamp=False)
    else:
        items = session.scored(inputs, exclude_for=exclude_for if reference_index_of else None)
    with closing(items):
        for item in items:
            reporter.advance()
            if item.error:
                problems.failures.append(item)
                reporter.warn(f"{item.relpath}: {item.error}")
                continue
            # mutual: the threshold applies to the raw score, which does not move with the pool's ranking
            image_scores.append(item.pool.raw_score if item.pool is not None else image_score(item)[0])  # type: ignore[arg-type]
            pixel_scores.append(pixel_sample(full_resolution_map(item)))
    if not image_scores:
        raise SetupError("no good image could be scored; nothing calibrated")
    scores = np.asarray(image_scores, dtype=np.float64)
    result = calibrate(scores, np.concatenate(pixel_scores), options.fpr, options.pixel_fpr)
    record = calibration_record(session, options.good_dir, left_out, result)
    if memory is not None:
        update_metadata(memory, calibration=record)
        stored_in = memory.path
    else:
        stored_in = options.out
        write_text_atomic(stored_in, json.dumps(record, indent=2) + "\n")
    score_range = MAX_DISTANCE if options.mutual is not None else 1.0
    seconds = time.perf_counter() - started
    return CalibrateResult(result, scores, stored_in, left_out, seconds, problems, score_range=score_range)
