"""``winclip merge``: join the output folders of sharded scans into one output folder.

The merged folder is an ordinary output folder (scores.csv, heatmaps, thumbnails, run.json), so
``winclip report`` and every script that reads one scan's output read it the same way. Files are
hard-linked where the file system allows it, else copied; every file is read and written through opened
folders (io/safe_fs.py), and the output folder is locked like a scan's.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from winclip_cli.errors import SetupError
from winclip_cli.io.layout import (
    HEATMAP_DIR,
    RUN_NAME,
    OutputLayout,
    heatmap_relpath,
    is_heatmap_name,
    map_relpath,
    map_relpath_of_heatmap,
    thumbnail_relpaths,
    thumbnail_relpaths_of_heatmap,
)
from winclip_cli.io.outputs import (
    SCORES_CSV_ROW_LIMIT,
    ResultRow,
    iter_results_csv,
    write_results_csv_atomic,
    write_text_atomic,
)
from winclip_cli.io.safe_fs import (
    Confined,
    LinkInOutputError,
    NotRegularFileError,
    atomic_write,
    open_confined,
    open_folder,
    read_confined_bytes,
)
from winclip_cli.io.state import OutputLock, clean_stale_temporaries, refuse_links
from winclip_cli.jobs.record import CONFIG_KEYS, CONFIG_WORDS, merged_run_json
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


_SHARD = re.compile(r"([0-9]{1,9})/([0-9]{1,9})")


def completeness_warnings(sources: list[Path], runs: list[dict[str, Any]]) -> list[str]:
    """What a user should know before trusting a merge: missing or repeated shards, interrupted scans."""
    interrupted = [folder for folder, run in zip(sources, runs, strict=True) if run.get("interrupted")]
    warnings = [f"{folder}: its scan was interrupted" for folder in interrupted]
    shards = [_SHARD.fullmatch(run["shard"]) if isinstance(run.get("shard"), str) else None for run in runs]
    if shards and all(shards):
        counts = {int(shard[2]) for shard in shards if shard}
        if len(counts) > 1:
            warnings.append(f"the folders come from different shard counts ({', '.join(map(str, sorted(counts)))})")
        else:
            total = counts.pop()
            present = [int(shard[1]) for shard in shards if shard]
            missing = sorted(set(range(1, total + 1)) - set(present)) if total <= 100_000 else []
            repeated = sorted({k for k in present if present.count(k) > 1})
            if missing:
                warnings.append(f"shards {', '.join(map(str, missing))} of {total} are missing")
            if repeated:
                warnings.append(f"shards {', '.join(map(str, repeated))} of {total} appear more than once")
    return warnings


_RUN_JSON_LIMIT = 16 << 20  # a run.json is a few KB; more is not one winclip wrote


def _read_run(folder: Path) -> dict[str, Any]:
    run_json = OutputLayout(folder).run_json
    try:
        # never through a link, never blocking on a FIFO
        info = json.loads(read_confined_bytes(Confined(folder, RUN_NAME), _RUN_JSON_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{folder} is not a winclip output folder (no run.json)") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON, an endless number
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SetupError(f"cannot read {run_json}: {reason[:160] or 'nested too deeply'}") from None
    if not isinstance(info, dict):
        raise SetupError(f"{run_json} is not a winclip run record")
    return info


_PLAIN_MODE = ~(stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o111) & 0o7777


def _place(source: Confined, target: Confined) -> bool:
    """Put the regular file ``source`` (reached without any link) at ``target``, replacing what is there;
    False when there is no such file.

    A hard link where possible (same bytes, no copy) of a file with plain permissions that belongs to the
    user running winclip and has one link, else a copy written through descriptors (io/safe_fs.py): nothing
    a link planted at any name leads to is read or written, and no file another user owns (and could
    still write to through its inode) becomes part of the merged output."""
    try:
        handle = open_confined(source)
    except (FileNotFoundError, NotADirectoryError, LinkInOutputError, NotRegularFileError):
        return False
    with handle:
        info = os.fstat(handle.fileno())
        try:
            with open_folder(target.root, target.parts[:-1], create=False) as folder:
                present = os.lstat(target.name, dir_fd=folder)
            if stat.S_ISREG(present.st_mode) and (present.st_dev, present.st_ino) == (info.st_dev, info.st_ino):
                return True  # merged before: already this very file
        except (FileNotFoundError, NotADirectoryError):
            pass
        if _may_link(info) and _link_into(source, info, target):
            return True
        with atomic_write(target, fsync=False) as out:
            shutil.copyfileobj(handle, out, 1 << 20)
    return True


def _may_link(info: os.stat_result) -> bool:
    """Plain permissions, of this user, and one link (the shard's own): else another user could keep a
    name of the same inode and rewrite the merged file after the merge."""
    return stat.S_IMODE(info.st_mode) & ~_PLAIN_MODE == 0 and info.st_uid == os.geteuid() and info.st_nlink == 1


def _link_into(source: Confined, info: os.stat_result, target: Confined) -> bool:
    """Hard-link ``source`` (the file ``info`` describes) at ``target`` through opened folders."""
    try:
        with (
            open_folder(source.root, source.parts[:-1], create=False) as from_folder,
            open_folder(target.root, target.parts[:-1]) as to_folder,
        ):
            tmp = f".{target.name[:50]}.{secrets.token_hex(8)}.tmp"
            # follow_symlinks=False: a link swapped in at the source name is linked itself, never followed;
            # the check below then finds it is not the file that was opened and checked.
            os.link(source.name, tmp, src_dir_fd=from_folder, dst_dir_fd=to_folder, follow_symlinks=False)
            linked = os.lstat(tmp, dir_fd=to_folder)
            if not stat.S_ISREG(linked.st_mode) or (linked.st_dev, linked.st_ino) != (info.st_dev, info.st_ino):
                os.unlink(tmp, dir_fd=to_folder)
                return False
            os.replace(tmp, target.name, src_dir_fd=to_folder, dst_dir_fd=to_folder)
            return True
    except OSError:
        return False  # another file system, no hard links, ...: copied instead


def _is_own_heatmap(relpath: str) -> bool:
    """Whether ``relpath`` names a heatmap file that winclip could have written."""
    parts = relpath.split("/")
    return (
        len(parts) >= 2
        and parts[0] == HEATMAP_DIR
        and is_heatmap_name(relpath)
        and not any(part in ("", ".", "..") for part in parts)
        and "\\" not in relpath
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
    warnings = completeness_warnings(sources, runs)  # before anything is written: it cannot fail half-way
    merged: dict[str, ResultRow] = {}
    duplicates = 0
    origin: dict[str, Path] = {}
    for folder in sources:
        csv_path = OutputLayout(folder).scores_csv
        try:
            # one row at a time: a crafted scores.csv of hundreds of MB must not take gigabytes as dicts
            for number, values in enumerate(iter_results_csv(csv_path), start=2):
                try:
                    row = ResultRow.from_csv_dict(values)
                except (TypeError, ValueError) as err:
                    raise SetupError(f"{csv_path}:{number}: not a winclip result row ({err})") from None
                if row.path in merged:
                    duplicates += 1
                    continue
                if len(merged) >= SCORES_CSV_ROW_LIMIT:
                    raise SetupError(f"the shards hold more than {SCORES_CSV_ROW_LIMIT:,} rows, more than merge reads")
                merged[row.path] = row
                origin[row.path] = folder
        except FileNotFoundError:
            raise SetupError(f"{folder} has no scores.csv") from None
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise SetupError(f"cannot read {csv_path}: {reason[:160]}") from None
    out.mkdir(parents=True, exist_ok=True)
    refuse_links(out)
    # The output folder's lock, as a scan takes it: a scan or watch writing there, or a second merge,
    # makes this merge exit 4 instead of mixing files and rows that the folder's state does not know.
    with OutputLock(out, "merge"):
        clean_stale_temporaries(out)  # of a merge or scan killed before
        try:
            rows = _merge_files(merged, origin, out)
        except LinkInOutputError as err:
            raise SetupError(err.strerror) from None
        _write_merged(rows, runs, reference, sources, out)
    return MergeResult(rows=rows, duplicates=duplicates, sources=sources, warnings=warnings)


def _merge_files(merged: dict[str, ResultRow], origin: dict[str, Path], out: Path) -> list[ResultRow]:
    """Place every row's heatmap, map and thumbnails in ``out``; a row names only a heatmap placed there."""
    for path, row in merged.items():
        folder = origin[path]
        if row.status != "ok":
            continue
        # Paths are derived from the image path, or are the CSV's own heatmap name when that is one
        # winclip writes (a name with bytes that are not UTF-8 cannot be derived again from the CSV's
        # text): a crafted scores.csv cannot make merge read or write anything outside its folders.
        # The CSV also says which format the heatmap has (--heatmaps png or jpg), or that there is none.
        if row.heatmap:
            suffix = _suffix_of(row.heatmap)
            heatmap = row.heatmap if _is_own_heatmap(row.heatmap) else heatmap_relpath(row.path, suffix)
            if not _place(Confined(folder, heatmap), Confined(out, heatmap)):
                heatmap = heatmap_relpath(row.path, suffix)
                if not _place(Confined(folder, heatmap), Confined(out, heatmap)):
                    heatmap = ""  # no heatmap file in the shard: the merged row must not name one
            relpaths = [map_relpath_of_heatmap(heatmap), *thumbnail_relpaths_of_heatmap(heatmap)] if heatmap else []
        else:
            heatmap = ""
            relpaths = [map_relpath(row.path), *thumbnail_relpaths(row.path)]
        merged[path] = replace(row, heatmap=heatmap)
        for relpath in relpaths:
            _place(Confined(folder, relpath), Confined(out, relpath))
    return sorted(merged.values(), key=lambda row: row.path)


def _write_merged(
    rows: list[ResultRow], runs: list[dict[str, Any]], reference: dict[str, Any], sources: list[Path], out: Path
) -> None:
    write_results_csv_atomic(OutputLayout(out).scores_csv, rows)
    info = merged_run_json(reference, runs, sources, rows)
    write_text_atomic(OutputLayout(out).run_json, json.dumps(info, indent=2) + "\n")
