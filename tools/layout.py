"""Writing the class-folder layout that data.py reads, shared by the NIH extraction (extract.py) and
the phantoms (phantoms.py): a list of Entry, one per output PNG, is rendered in a small process pool,
then the manifest and summary are written, and files an earlier extract wrote that the new selection
does not list are removed. Only files an earlier extract listed as written are ever deleted,
replaced or reused (docs/safety.md).
"""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data import CLASSES, MANIFEST_FIELDS, SPLIT_DIRS, SPLITS, UnreadableImage, _image_files, center_crop_resize, load_grey
from plumbing.configs import CLIError
from plumbing.files import atomic_path, check_output, save_png, write_error


# --------------------------------------------------------------------------- writing the layout
#
# Shared by the NIH extraction (extract.py) and the phantoms (phantoms.py): a list of Entry,
# one per output PNG, is rendered (in a small process pool), then the manifest
# and summary are written and the files an earlier extract into OUT wrote that the
# new selection does not list are removed, so that the folders hold exactly what the
# manifest says (the loaders read folders, and a stale file could put a patient in
# two splits). Extract deletes, replaces or reuses ONLY files that an earlier extract
# listed as written (its manifest.csv, or the pending list of one that was stopped);
# any other image in the split folders, or a data set of another source, is a
# refusal before anything is written.


@dataclass(frozen=True)
class Entry:
    """One image of the layout and how to make it."""

    image: str       # output path relative to OUT: train_data/infiltration/00000001_000.png
    cls: str         # infiltration | no_finding
    split: str       # train | validation | test
    patient_id: str
    source: str      # the source file, or "phantom:seed=S:index=I"
    recipe: tuple    # (function, *args): the image is function(*args, size), uint8 (size, size)


PENDING = ".extract-pending.csv"  # image,source of every file an unfinished extract may have written
UNKNOWN_SOURCE = "?"  # in PENDING: a file being replaced, which may hold the old or the new source's pixels
SOURCE_NAMES = {"phantoms": "synthetic phantoms", "nih": "NIH images"}
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.[^.]+")  # atomic_path's temporary of the file NAME


def entry_path(split: str, cls: str, stem: str) -> str:
    return f"{SPLIT_DIRS[split]}/{cls}/{stem}.png"


def source_kind(source: str) -> str:
    """'phantoms' or 'nih': which kind of data set a manifest's source column belongs to."""
    return "phantoms" if source.startswith("phantom:") else "nih"


def _make_dirs(folders) -> None:
    for d in folders:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, d) if e.errno == errno.ENOSPC else CLIError(
                f"cannot create output folder {d}: {e.strerror or e}") from e


def _read_rows(path: Path) -> list[dict]:
    """The rows of a manifest-like CSV (image and source columns at least)."""
    try:
        # surrogateescape: a source path that is not UTF-8 (a Latin-1 folder) round-trips byte for byte
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, csv.Error) as e:
        raise CLIError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    if not {"image", "source"} <= set(reader.fieldnames or ()):
        raise CLIError(f"{path} is not a manifest written by extract (columns: {', '.join(reader.fieldnames or ())})")
    return rows


def _write_rows(path: Path, fields: tuple[str, ...], rows) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(fields)
            w.writerows(rows)
    except OSError as e:  # atomic_path turns a full disk while writing into a CLIError; this is the rest
        raise write_error(e, path) from e


def read_manifest(out: str | os.PathLike) -> list[dict]:
    """The rows of OUT/manifest.csv as dicts."""
    path = Path(out) / "manifest.csv"
    if not path.is_file():
        raise CLIError(f"no manifest.csv in {out}")
    return _read_rows(path)


def written_before(out: Path) -> dict[str, str]:
    """image -> source of every file an earlier extract into OUT wrote: its
    manifest.csv, updated by the pending list of an extract that was stopped
    before it finished (that list names everything the run could have written)."""
    ours = {}
    for name in ("manifest.csv", PENDING):
        if (out / name).exists():
            ours.update({r["image"]: r["source"] or "" for r in _read_rows(out / name) if r["image"]})
    return ours


def open_out_dir(out: str | os.PathLike, entries: list[Entry]) -> dict[str, str]:
    """Check, before anything is written, that extract may write `entries` into OUT;
    create OUT; return what an earlier extract wrote there (image -> source), the
    only files this one may reuse, replace or delete. Refused in one line: OUT
    holding a data set of another source (replacing it is the user's choice: another
    --out), and any image in the split folders that no extract wrote (it would be
    read with the data set, and extract never deletes or replaces it)."""
    out = check_output(out, "--out", folder=True)
    ours = written_before(out) if out.is_dir() else {}
    kinds = {source_kind(s) for s in ours.values() if s != UNKNOWN_SOURCE}
    kind = source_kind(entries[0].source)
    if kinds and kind not in kinds:
        raise CLIError(f"--out {out} holds a data set of {' and '.join(SOURCE_NAMES[k] for k in sorted(kinds))} "
                       f"(see its manifest.csv); {SOURCE_NAMES[kind]} would replace it: choose another --out")
    if not ours and (out / "summary.json").exists():
        raise CLIError(f"--out {out} has a summary.json but no manifest.csv: it is not a folder extract wrote; "
                       f"choose another --out")
    foreign = [p for d in SPLIT_DIRS.values() if (out / d).is_dir() for p in _image_files(out / d)
               if p.relative_to(out).as_posix() not in ours]
    if foreign:
        raise CLIError(f"--out {out} holds {len(foreign)} image(s) in its split folders that extract did not write "
                       f"(such as {foreign[0]}); extract never deletes or replaces them: move them or choose "
                       f"another --out")
    folders = [out] + [out / SPLIT_DIRS[s] / c for s in SPLITS for c in CLASSES]
    for d in folders + [d.parent for d in folders[1:]]:
        if d.exists() and not d.is_dir():
            raise CLIError(f"--out {out}: {d} is a file, not a folder")
    _make_dirs([out])
    if not os.access(out, os.W_OK):
        raise CLIError(f"output folder {out} is not writable")
    return ours


def _is_current(path: Path, size: int) -> bool:
    """An existing output of the right size and mode. Only the header is read:
    outputs are written atomically, so a file that exists is a whole file."""
    try:
        with Image.open(path) as im:
            return im.size == (size, size) and im.mode == "L"
    except (OSError, ValueError, SyntaxError):
        return False


def read_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    """The recipe of an image copied from a file: decoded, centre-cropped, resized."""
    return center_crop_resize(load_grey(path), size)


def _render(job: tuple) -> tuple[int, str, str]:
    """Make one output PNG (runs in a worker process). Returns (index, status,
    message), status one of reused, written, unreadable. A file is reused only when
    an earlier extract wrote it from the same source (same name, same pixels)."""
    index, dst, size, reusable, (make, *args) = job
    if reusable and _is_current(dst, size):
        return index, "reused", ""
    try:
        img = make(*args, size)
    except UnreadableImage as e:
        return index, "unreadable", str(e)
    try:
        save_png(img, dst)  # a CLIError (a full disk) reaches the parent as itself: one line
    except OSError as e:
        raise write_error(e, dst) from None
    return index, "written", ""


def _remove_temporaries(out: Path, images) -> None:
    """Delete atomic-write temporaries that a stopped run left of OUT's own files
    (`images`, relative to OUT, and the manifest, summary and pending list)."""
    names: dict[Path, set[str]] = {out: {"manifest.csv", "summary.json", PENDING}}
    for image in images:
        names.setdefault((out / image).parent, set()).add(Path(image).name)
    for folder, own in names.items():
        for f in folder.iterdir() if folder.is_dir() else ():
            m = _TEMPORARY.fullmatch(f.name)
            if m and m.group(1) in own and f.is_file():
                f.unlink()


def render_entries(entries: list[Entry], out: Path, size: int, workers: int = 2, progress: bool = True,
                   previous: dict[str, str] | None = None) -> tuple[dict[str, int], list[tuple[Entry, str]]]:
    """Write every entry's PNG under out, reusing the current ones that `previous`
    (open_out_dir's answer) says came from the same source. Before the first PNG,
    OUT/.extract-pending.csv lists every file this run may write, so that a run
    stopped half-way leaves nothing extract cannot account for. Returns the count
    per status and the unreadable entries with their error."""
    from tqdm import tqdm

    previous = previous or {}
    pending = dict(previous)
    for e in entries:  # a file replaced from another source may hold either's pixels until it is rewritten
        pending[e.image] = e.source if previous.get(e.image, e.source) == e.source else UNKNOWN_SOURCE
    _write_rows(out / PENDING, ("image", "source"), sorted(pending.items()))
    _make_dirs(sorted({(out / e.image).parent for e in entries}))
    jobs = [(i, out / e.image, size, previous.get(e.image) == e.source, e.recipe) for i, e in enumerate(entries)]
    counts = {"written": 0, "reused": 0, "unreadable": 0}
    failed = []
    pool = None
    if workers > 1 and len(jobs) >= 64:  # below that, starting processes costs more than it saves
        # fork: the workers need nothing but the recipes' functions, already loaded.
        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers)
    try:
        results = pool.imap_unordered(_render, jobs, chunksize=8) if pool else map(_render, jobs)
        for i, status, message in tqdm(results, total=len(jobs), desc=f"writing {out}", unit="img",
                                       disable=not progress or len(jobs) < 64, dynamic_ncols=True):
            counts[status] += 1
            if status == "unreadable":
                warnings.warn(f"skipping unreadable image {message}", stacklevel=2)
                failed.append((entries[i], message))
    finally:
        if pool is not None:
            pool.terminate()  # a worker killed mid-write leaves its temporary: removed next
            pool.join()
        _remove_temporaries(out, [e.image for e in entries])
    return counts, failed


def remove_stale(out: Path, written: set[str], keep: set[str]) -> int:
    """Delete the files an earlier extract wrote (`written`) that the new manifest
    does not list (`keep`): an earlier run with another seed, size or selection.
    Only paths of the layout's own form are touched (a hand-edited manifest cannot
    point this anywhere else). Returns how many were removed."""
    removed = 0
    for image in sorted(written - keep):
        parts = image.split("/")
        if (len(parts) != 3 or parts[0] not in SPLIT_DIRS.values() or parts[1] not in CLASSES
                or not parts[2].endswith(".png") or parts[2].startswith(".")):
            continue
        f = out / image
        if f.is_file() and not f.is_symlink():
            f.unlink()
            removed += 1
    return removed


def write_manifest(out: Path, entries: list[Entry]) -> None:
    """OUT/manifest.csv: image,class,split,patient_id,source, one row per image."""
    _write_rows(out / "manifest.csv", MANIFEST_FIELDS,
                ((e.image, e.cls, e.split, e.patient_id, e.source)
                 for e in sorted(entries, key=lambda e: (SPLITS.index(e.split), e.cls, e.image))))


def count_layout(entries: list[Entry]) -> dict:
    """Images per split and class, and patients per split."""
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    patients = {s: set() for s in SPLITS}
    for e in entries:
        counts[e.split][e.cls] += 1
        patients[e.split].add(e.patient_id)
    return {"counts": counts, "patients": {s: len(p) for s, p in patients.items()}, "total": len(entries)}


def finish_layout(out: Path, entries: list[Entry], summary: dict) -> dict:
    """Manifest, removal of what earlier runs wrote and this one does not list,
    OUT/summary.json, and the pending list last; returns the summary."""
    written = set(written_before(out))  # the old manifest and this run's pending list, read before either changes
    write_manifest(out, entries)
    keep = {e.image for e in entries}
    summary["removed_stale"] = remove_stale(out, written, keep)
    path = out / "summary.json"
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise write_error(e, path) from e
    (out / PENDING).unlink(missing_ok=True)
    _remove_temporaries(out, written | keep)
    return summary


