"""``winclip merge``: join the output folders of sharded scans into one output folder.

The merged folder is an ordinary output folder (scores.csv, heatmaps, thumbnails, run.json), so
``winclip report`` and every script that reads one scan's output read it the same way. Files are
hard-linked where the file system allows it, else copied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from winclip_cli import __version__
from winclip_cli.errors import SetupError
from winclip_cli.io.layout import (
    HEATMAP_DIR,
    OutputLayout,
    heatmap_relpath,
    map_relpath,
    map_relpath_of_heatmap,
    thumbnail_relpaths,
    thumbnail_relpaths_of_heatmap,
)
from winclip_cli.io.outputs import (
    LinkInOutputError,
    ResultRow,
    confined_path,
    read_results_csv,
    write_results_csv_atomic,
    write_text_atomic,
)
from winclip_cli.io.state import refuse_links

# run.json keys that must agree for rows to be comparable
CONFIG_KEYS = (
    "architecture",
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
)


# what each of those keys is, in the words of the options that set it
CONFIG_WORDS = {
    "architecture": "model architecture (--model)",
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


# run.json keys that describe one run (its timing and counts): recomputed for the merged folder
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


def _summed(runs: list[dict[str, Any]], key: str) -> float:
    total = 0.0
    for run in runs:
        try:
            total += float(run.get(key) or 0)
        except (TypeError, ValueError):
            pass  # a hand-edited run.json: its figure is left out rather than failing the merge
    return round(total, 3)


@dataclass
class MergeResult:
    rows: list[ResultRow]
    duplicates: int
    sources: list[Path]
    warnings: list[str]


def completeness_warnings(sources: list[Path], runs: list[dict[str, Any]]) -> list[str]:
    """What a user should know before trusting a merge: missing or repeated shards, interrupted scans."""
    interrupted = [folder for folder, run in zip(sources, runs, strict=True) if run.get("interrupted")]
    warnings = [f"{folder}: its scan was interrupted" for folder in interrupted]
    shards = [run.get("shard") for run in runs]
    if all(isinstance(shard, str) and "/" in shard for shard in shards):
        counts = {int(shard.split("/")[1]) for shard in shards}
        if len(counts) > 1:
            warnings.append(f"the folders come from different shard counts ({', '.join(map(str, sorted(counts)))})")
        else:
            total = counts.pop()
            present = [int(shard.split("/")[0]) for shard in shards]
            missing = sorted(set(range(1, total + 1)) - set(present))
            repeated = sorted({k for k in present if present.count(k) > 1})
            if missing:
                warnings.append(f"shards {', '.join(map(str, missing))} of {total} are missing")
            if repeated:
                warnings.append(f"shards {', '.join(map(str, repeated))} of {total} appear more than once")
    return warnings


def _read_run(folder: Path) -> dict[str, Any]:
    run_json = OutputLayout(folder).run_json
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{folder} is not a winclip output folder (no run.json)") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON, an endless number
        raise SetupError(f"cannot read {run_json}: {str(err)[:120] or 'nested too deeply'}") from None
    if not isinstance(info, dict):
        raise SetupError(f"{run_json} is not a winclip run record")
    return info


def _place(source: Path, target: Path) -> None:
    """Hard link (cheap, same bytes) or copy ``source`` to ``target``, replacing what is there."""
    if target.exists() and not target.is_symlink() and os.path.samefile(source, target):
        return  # merged before: os.replace between two links of one file would leave the temporary
    tmp = target.with_name(f".{target.name}.merge.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _own_file(folder: Path, relpath: str) -> Path | None:
    """``folder/relpath`` when it is a regular file of the folder itself (no symlink anywhere below it)."""
    path = folder / relpath
    try:
        if path.is_symlink() or not path.is_file():
            return None
        if not path.resolve().is_relative_to(folder.resolve()):
            return None
    except OSError:
        return None
    return path


def _is_own_heatmap(folder: Path, relpath: str) -> bool:
    """Whether ``relpath`` names a heatmap file that winclip could have written in ``folder``."""
    parts = relpath.split("/")
    return (
        len(parts) >= 2
        and parts[0] == HEATMAP_DIR
        and relpath.endswith((".png", ".jpg"))
        and not any(part in ("", ".", "..") for part in parts)
        and "\\" not in relpath
        and _own_file(folder, relpath) is not None
    )


def merge_outputs(sources: list[Path], out: Path) -> MergeResult:
    if not sources:
        raise SetupError("give at least one output folder to merge")
    out_resolved = out.resolve()
    for folder in sources:
        if folder.resolve() == out_resolved:
            raise SetupError(f"--out {out} is one of the folders being merged; choose a new folder")
    runs = [_read_run(folder) for folder in sources]
    # a shard that held no file loaded no model (jobs/plan.py): it has no rows whose configuration could differ
    compared = [
        (folder, run) for folder, run in zip(sources, runs, strict=True) if run.get("model_loaded") is not False
    ]
    reference_folder, reference = compared[0] if compared else (sources[0], runs[0])
    for folder, run in compared[1:]:
        differing = [key for key in CONFIG_KEYS if run.get(key) != reference.get(key)]
        if differing:
            raise SetupError(
                f"{folder} was scanned with another {', '.join(CONFIG_WORDS.get(k, k) for k in differing)} "
                f"than {reference_folder}; "
                "only scans of the same configuration can be merged"
            )
    merged: dict[str, ResultRow] = {}
    duplicates = 0
    origin: dict[str, Path] = {}
    for folder in sources:
        csv_path = OutputLayout(folder).scores_csv
        if not csv_path.is_file():
            raise SetupError(f"{folder} has no scores.csv")
        for number, values in enumerate(read_results_csv(csv_path), start=2):
            try:
                row = ResultRow.from_csv_dict(values)
            except (TypeError, ValueError) as err:
                raise SetupError(f"{csv_path}:{number}: not a winclip result row ({err})") from None
            if row.path in merged:
                duplicates += 1
                continue
            merged[row.path] = row
            origin[row.path] = folder
    out.mkdir(parents=True, exist_ok=True)
    refuse_links(out)
    for path, row in merged.items():
        folder = origin[path]
        if row.status != "ok":
            continue
        # Paths are derived from the image path, or are the CSV's own heatmap name when that is one
        # winclip writes (a name with bytes that are not UTF-8 cannot be derived again from the CSV's
        # text): a crafted scores.csv cannot make merge read or write anything outside its folders.
        # The CSV also says which format the heatmap has (--heatmaps png or jpg), or that there is none.
        if row.heatmap:
            suffix = ".jpg" if row.heatmap.endswith(".jpg") else ".png"
            heatmap = row.heatmap if _is_own_heatmap(folder, row.heatmap) else heatmap_relpath(row.path, suffix)
            relpaths = [heatmap, map_relpath_of_heatmap(heatmap), *thumbnail_relpaths_of_heatmap(heatmap)]
        else:
            heatmap = ""
            relpaths = [map_relpath(row.path), *thumbnail_relpaths(row.path)]
        merged[path] = replace(row, heatmap=heatmap)
        for relpath in relpaths:
            source = _own_file(folder, relpath)
            if source is not None:
                try:
                    _place(source, confined_path(out, relpath))
                except LinkInOutputError as err:
                    raise SetupError(err.strerror) from None
    rows = sorted(merged.values(), key=lambda row: row.path)
    write_results_csv_atomic(OutputLayout(out).scores_csv, rows)
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
        merged=datetime.now(UTC).isoformat(timespec="seconds"),
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
        unlisted_dirs=[folder for run in runs for folder in run.get("unlisted_dirs") or []],
    )
    # shards written with different --heatmaps (each row's heatmap cell says which it has): all named
    formats = [f for run in runs for f in str(run.get("heatmaps") or "").split(",") if f]
    if formats:
        info["heatmaps"] = ",".join(dict.fromkeys(formats))
    write_text_atomic(OutputLayout(out).run_json, json.dumps(info, indent=2) + "\n")
    return MergeResult(rows=rows, duplicates=duplicates, sources=sources, warnings=completeness_warnings(sources, runs))
