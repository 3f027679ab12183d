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
from pathlib import Path
from typing import Any

from winclip_cli.errors import SetupError
from winclip_cli.io.layout import (
    HEATMAP_DIR,
    OutputLayout,
    heatmap_relpath,
    is_heatmap_name,
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
from winclip_cli.jobs.record import CONFIG_KEYS, merged_run_json
from winclip_cli.options import DEFAULT_HEATMAPS, HEATMAP_SUFFIXES, HeatmapFormat


def _suffix_of(heatmap: str) -> str:
    """The suffix of the format a CSV's heatmap cell names (the default format's when it names none)."""
    default = HeatmapFormat(DEFAULT_HEATMAPS).suffix
    return next((suffix for suffix in HEATMAP_SUFFIXES if heatmap.endswith(suffix)), default)


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
    shards = [shard for run in runs if isinstance(shard := run.get("shard"), str) and "/" in shard]
    if len(shards) == len(runs):
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
        and is_heatmap_name(relpath)
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
    reference = runs[0]
    for folder, run in zip(sources[1:], runs[1:], strict=True):
        differing = [key for key in CONFIG_KEYS if run.get(key) != reference.get(key)]
        if differing:
            raise SetupError(
                f"{folder} was scanned with another {', '.join(differing)} than {sources[0]}; "
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
            own = _is_own_heatmap(folder, row.heatmap)
            heatmap = row.heatmap if own else heatmap_relpath(row.path, _suffix_of(row.heatmap))
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
    info = merged_run_json(reference, runs, sources, rows)
    write_text_atomic(OutputLayout(out).run_json, json.dumps(info, indent=2) + "\n")
    return MergeResult(rows=rows, duplicates=duplicates, sources=sources, warnings=completeness_warnings(sources, runs))
