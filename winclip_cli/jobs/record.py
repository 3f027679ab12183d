"""What a run records about itself, in one schema: the calibration fingerprint, the run state's
configuration, ``run.json`` (of a scan, a watch and a merge) and a calibration record.

``scan``, ``watch``, ``merge`` and ``calibrate`` build these records here and nowhere else, so a
key added to one cannot be missed by another: the fingerprint a calibration stores is the one a
scan compares it with, the state configuration holds the fingerprint, and ``merge`` compares the
keys of run.json that the configuration decides (:data:`CONFIG_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from winclip_cli import __version__
from winclip_cli.io.outputs import CSV_COLUMNS, ResultRow
from winclip_cli.options import ScoringMode

if TYPE_CHECKING:
    from winclip_cli.core.calibration import Calibration
    from winclip_cli.jobs.kernel import Session
    from winclip_cli.jobs.scan import ScanSpec, ThresholdChoice
    from winclip_cli.jobs.write import RowContext, ScanSummary

# run.json keys that must agree for rows of two output folders to be comparable (merge)
CONFIG_KEYS = (
    "architecture",
    "model_config_sha256",
    "weights_sha256",
    "precision",
    "scales",
    "class_name",
    "vocabulary_sha256",
    "memory_id",
    "tile",
    "tile_overlap",
    "threshold",
    "pixel_threshold",
    "mode",  # WinCLIP and mutual scores are on other scales; mutual pools must be alike
    "pool_size",
    "layers",
)
# what each of those keys is, in the words of the options that set it (merge's messages)
CONFIG_WORDS = {
    "architecture": "model architecture (--model)",
    "model_config_sha256": "model config (--model)",
    "weights_sha256": "weights (--weights)",
    "precision": "--precision",
    "scales": "--scales",
    "class_name": "class (--class)",
    "vocabulary_sha256": "vocabulary (--class, --prompts)",
    "memory_id": "reference memory (--refs)",
    "tile": "--tile",
    "tile_overlap": "--tile-overlap",
    "threshold": "threshold",
    "pixel_threshold": "pixel threshold (calibration)",
}
# run.json keys that describe one run (its timing and counts): recomputed for a merged folder
DURATION_KEYS = ("seconds", "setup_seconds", "scan_seconds", "process_seconds", "startup_seconds", "model_seconds")
PER_RUN_KEYS = frozenset(
    {
        "started",
        "finished",
        *DURATION_KEYS,
        "images",
        "scored",
        "anomalies",
        "errors",
        "unchanged",
        "total_rows",
        "total_anomalies",
        "total_errors",
        "interrupted",
        "unlisted_dirs",
        "model_loaded",
    }
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def calibration_fingerprint(session: Session) -> dict[str, Any]:
    """What a calibration depends on: the same fingerprint must hold when it is used."""
    engine, tiling = session.engine, session.prep.tiling
    assert engine is not None
    if session.extractor is not None:
        # mutual scores use neither the prompts nor the windows: a calibration holds whatever the class
        return {
            "mode": ScoringMode.MUTUAL.value,
            "architecture": engine.backbone.architecture,
            "weights_sha256": engine.backbone.weights_sha256,
            "precision": engine.backbone.precision,
            "layers": list(session.extractor.layers),
            "tile": tiling.size,
            "tile_overlap": tiling.recorded_overlap,
        }
    return {
        "architecture": engine.backbone.architecture,
        "weights_sha256": engine.backbone.weights_sha256,
        "precision": engine.backbone.precision,
        "scales": list(engine.scorer.scales),
        "vocabulary_sha256": engine.ensemble.sha256,
        "memory": session.memory_id,
        "tile": tiling.size,
        "tile_overlap": tiling.recorded_overlap,
    }


def calibration_record(session: Session, good_dir: Path, left_out: int, calibration: Calibration) -> dict[str, Any]:
    """What ``calibrate`` stores (in the memory or a calibration file) and ``scan`` reads back."""
    assert session.engine is not None
    return {
        "tool": "winclip",
        "version": __version__,
        "created": now(),
        "class_name": session.engine.ensemble.class_name,
        "good_dir": str(good_dir),
        "leave_one_out": left_out,
        "calibration": calibration.as_dict(),
        "fingerprint": calibration_fingerprint(session),
    }


@dataclass(frozen=True)
class ScanRecord:
    """A scan's (or a watch's) record: its spec, its loaded session and its threshold. The state
    configuration decides whether stored rows can be kept; run.json says how the rows were made."""

    spec: ScanSpec
    session: Session
    context: RowContext
    choice: ThresholdChoice

    def fingerprint(self) -> dict[str, Any]:
        return calibration_fingerprint(self.session)

    def state_config(self) -> dict[str, Any]:
        """What stored rows were made with: a change rescans everything (``--incremental``)."""
        spec, engine = self.spec, self.session.engine
        assert engine is not None
        return {
            **self.fingerprint(),
            "model_config_sha256": engine.backbone.config_sha256,  # two configs of one name are two models
            "class_name": engine.ensemble.class_name,
            "pixel_threshold": self.choice.pixel,
            "max_pixels": spec.inputs.max_pixels,
            # another folder or shard in the same OUT must never mix with (or delete) the stored rows
            "input": str(spec.directory.resolve()),
            "shard": list(spec.shard) if spec.shard else None,
            **self._mutual(),
        }

    def _mutual(self) -> dict[str, Any]:
        """Mode mutual's settings (pools of at most ``pool_size`` images, the blocks compared); nothing
        for the other modes, whose records stay as they were."""
        session = self.session
        if session.extractor is None or session.mutual is None:
            return {}
        return {"pool_size": int(session.mutual.pool_size), "layers": list(session.extractor.layers)}

    def run_json(self) -> dict[str, Any]:
        """run.json as a scan starts: what is needed to reproduce the run."""
        spec, engine, context, choice = self.spec, self.session.engine, self.context, self.choice
        assert engine is not None
        backbone = engine.backbone
        return {
            "tool": "winclip",
            "version": __version__,
            "started": now(),
            "input": str(spec.directory),
            "class_name": engine.ensemble.class_name,
            **backbone.identity,
            "device": str(backbone.device),
            "batch_size": self.session.batch_size,  # as given, or what --batch-size auto chose
            "scales": list(engine.scorer.scales),
            "threshold": choice.value,
            "threshold_source": choice.source,
            "pixel_threshold": choice.pixel,
            "vocabulary": engine.ensemble.vocabulary.source,
            "vocabulary_sha256": engine.ensemble.sha256,
            "mode": context.mode,
            "refs": context.refs,
            "refs_sha256": context.refs_sha256,
            "memory_id": self.session.memory_id,
            "k_shot": context.k_shot,
            "tile": spec.inputs.tiling.size,
            "tile_overlap": spec.inputs.tiling.recorded_overlap,
            "incremental": spec.incremental,
            "heatmaps": spec.output.heatmaps.value,
            "shard": f"{spec.shard[0]}/{spec.shard[1]}" if spec.shard else None,
            "columns": list(CSV_COLUMNS),
            **self._mutual(),
        }


def run_timing(
    startup: float | None, job_seconds: float, model_seconds: float, model_loaded: bool = True
) -> dict[str, Any]:
    """run.json's wall-time figures: the whole process, its start-up before the job (Python, imports,
    argument checks), the model's loading (with text embeddings and memory), and whether it was loaded."""
    return {
        "process_seconds": round(startup + job_seconds, 3) if startup is not None else None,
        "startup_seconds": round(startup, 3) if startup is not None else None,
        "model_loaded": model_loaded,
        "model_seconds": round(model_seconds, 3),
    }


def scan_totals(
    summary: ScanSummary,
    rows: list[ResultRow],
    *,
    seconds: float,
    scan_seconds: float,
    startup_seconds: float | None = None,
    model_seconds: float = 0.0,
    unchanged: int,
    interrupted: bool,
    unlisted: list[str],
) -> dict[str, Any]:
    """What run.json adds when a scan ends: its timing, and the counts of this run and of scores.csv."""
    return {
        "finished": now(),
        "seconds": round(seconds, 3),
        "setup_seconds": round(seconds - scan_seconds, 3),  # model load, text embeddings, state
        "scan_seconds": round(scan_seconds, 3),  # decoding, model and outputs, overlapped
        **run_timing(startup_seconds, seconds, model_seconds),
        "images": summary.images,
        "scored": summary.scored,
        "anomalies": summary.anomalies,
        "errors": summary.errors,
        "unchanged": unchanged,
        "total_rows": len(rows),
        "total_anomalies": sum(r.label == "anomalous" for r in rows),
        "total_errors": sum(bool(r.error) for r in rows),  # counted as `errors` is
        "interrupted": interrupted,
        "unlisted_dirs": unlisted,
    }


def watch_totals(scored: int, anomalies: int, errors: int) -> dict[str, Any]:
    """What run.json adds when a watch stops."""
    return {"watch": True, "stopped": now(), "scored": scored, "anomalies": anomalies, "errors": errors}


def _summed(runs: list[dict[str, Any]], key: str) -> float:
    total = 0.0
    for run in runs:
        try:
            total += float(run.get(key) or 0)
        except (TypeError, ValueError):
            pass  # a hand-edited run.json: its figure is left out rather than failing the merge
    return round(total, 3)


def merged_run_json(
    reference: dict[str, Any], runs: list[dict[str, Any]], sources: list[Path], rows: list[ResultRow]
) -> dict[str, Any]:
    """run.json of a merged folder: the first shard's configuration, the merged rows' counts."""
    info = {key: value for key, value in reference.items() if key not in PER_RUN_KEYS}
    counts = {
        "images": len(rows),
        "scored": sum(r.status == "ok" for r in rows),
        "anomalies": sum(r.label == "anomalous" for r in rows),
        "errors": sum(bool(r.error) for r in rows),  # as a scan counts them: unreadable, or outputs unwritten
    }
    info.update(
        tool="winclip",
        version=__version__,
        merged_from=[str(folder) for folder in sources],
        merged=now(),
        shard=None,
        **counts,
        # the merged scores.csv is the whole result: its totals are the counts above
        total_rows=counts["images"],
        total_anomalies=counts["anomalies"],
        total_errors=counts["errors"],
        # Durations are summed over the merged scans: the compute they took together. Shards that ran
        # in parallel took less wall-clock time; each shard's own run.json keeps its figures.
        durations="summed over the merged scans",
        **{key: _summed(runs, key) for key in DURATION_KEYS},
        interrupted=any(bool(run.get("interrupted")) for run in runs),
        unlisted_dirs=[folder for run in runs for folder in run.get("unlisted_dirs") or [] if isinstance(folder, str)],
    )
    # mode mutual: every shard's pools (named "SHARD:POOL"), not only the first shard's
    if any("pools" in run for run in runs):
        info["pools"] = [pool for run in runs for pool in run.get("pools") or []]
    # shards written with different --heatmaps (each row's heatmap cell says which it has): all named
    formats = [f for run in runs for f in str(run.get("heatmaps") or "").split(",") if f]
    if formats:
        info["heatmaps"] = ",".join(dict.fromkeys(formats))
    return info
