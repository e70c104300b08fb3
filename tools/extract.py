"""NIH ChestX-ray14 -> the two-class layout, split by patient.

Wang et al., "ChestX-ray8", CVPR 2017 (NIH Clinical Center). In order:
1. read the metadata CSV (Data_Entry_2017.csv, its _v2020 version, gzipped or not, or the
   original experiment's final_data.csv) into (image, labels, patient) rows;
2. candidates: `infiltration` = "Infiltration" among the |-separated labels (or the only
   label, --infiltration-only), `no_finding` = exactly "No Finding";
3. rows whose file is not under the image root are skipped;
4. patients are shuffled with the seed and cut 70/10/20 into train/validation/test, so no
   patient is in two splits (or the official test list is the test split, the rest 70:10);
5. within each split the larger class is randomly subsampled to the smaller (and --per-class);
6. each image is centre-cropped, resized and written as 8-bit grey PNG (layout.render_entries).
Then manifest.csv and summary.json, every loss counted in its "skipped"; `run(ExtractConfig)` does it, or writes
phantoms (tools/phantoms.py). Why it differs from the original experiment: docs/data.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools import phantoms
from data import CLASSES, IMAGE_EXTENSIONS, SPLIT_FRACTIONS, SPLITS
from plumbing.files import check_output
from tools.layout import Entry, count_layout, entry_path, finish_layout, open_out_dir, read_resized, render_entries
from plumbing.configs import check_config, CLIError, flag
from tools import layout

IMAGE_COLUMN, LABELS_COLUMN, PATIENT_COLUMN = "Image Index", "Finding Labels", "Patient ID"
CLASS_LABELS = {"infiltration": "'Infiltration'", "no_finding": "'No Finding'"}  # as NIH spells them


@dataclass
class ExtractConfig:
    """The `extract` command's options: NIH mode (csv, images, ...) or phantom mode (phantoms)."""

    csv: Path | None = flag(None, "NIH Data_Entry_2017(_v2020).csv[.gz] or the original experiment's "
                            "final_data.csv", metavar="FILE")
    images: Path | None = flag(None, "image root, searched recursively (images_001/images/*.png ...); "
                               "optional with --dry-run", metavar="DIR")
    out: Path | None = flag(None, "output folder (optional with --dry-run)", metavar="DIR")
    per_class: int | None = flag(None, "at most N images per class, spread 70/10/20 over the splits "
                                 "(None: all that balance allows)", min=1, metavar="N")
    seed: int = flag(0, "seed of the patient split and the balancing sample", min=0, metavar="S")
    size: int = flag(256, "output images are SIZE x SIZE, 8-bit grey", min=8, metavar="N")
    infiltration_only: bool = flag(False, "infiltration = Infiltration as the only label, instead of anywhere "
                                   "among the labels")
    official_test_list: Path | None = flag(None, "NIH test_list.txt: these images form the test split; the rest "
                                           "is split 70:10 by patient", metavar="FILE")
    dry_run: bool = flag(False, "select and split from the CSV alone (and --images, if given, to drop files not "
                         "on disk); write nothing")
    json: bool = flag(False, "print the summary as one JSON object on the last line")
    phantoms: int | None = flag(None, "write N synthetic phantoms in total, split evenly between the two classes "
                                "(odd N: one more no_finding) instead of reading NIH data", min=2, metavar="N")
    workers: int = flag(2, "processes that decode and resize", min=1, metavar="N")
    progress: bool = True  # a progress bar on stderr (main.py turns it off with --json)

    def __post_init__(self):
        check_config(self)
        if self.phantoms is not None:
            clash = [name for name, value in (("--csv", self.csv), ("--images", self.images),
                                              ("--per-class", self.per_class),
                                              ("--infiltration-only", self.infiltration_only),
                                              ("--official-test-list", self.official_test_list),
                                              ("--dry-run", self.dry_run)) if value]
            if clash:
                raise CLIError(f"--phantoms cannot be combined with {', '.join(clash)}")
            if self.out is None:
                raise CLIError("--out is required")
            return
        if self.csv is None:
            raise CLIError("--csv is required (or --phantoms N for synthetic data)")
        if not self.dry_run and self.images is None:
            raise CLIError("--images is required (unless --dry-run)")
        if not self.dry_run and self.out is None:
            raise CLIError("--out is required (unless --dry-run)")


@dataclass(frozen=True)
class Row:
    image: str    # 00000001_000.png
    labels: str   # Cardiomegaly|Emphysema
    patient: str  # "1"


# --------------------------------------------------------------------------- reading the metadata


def _open_text(path: Path) -> io.TextIOBase:
    """The file as text, gunzipped when it is gzip (by content, not by name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if gz else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def patient_from_image(image: str) -> str:
    """NIH names images <patient>_<follow-up>.png: 00000001_000.png -> "1"."""
    prefix = image.split("_", 1)[0]
    return str(int(prefix)) if prefix.isdigit() else prefix


def read_metadata(path: str | os.PathLike) -> tuple[list[Row], dict[str, int]]:
    """Rows of an NIH metadata CSV, matched by column name, and the count of
    malformed or duplicate rows skipped.

    The official header has 9 names but each row 11 fields, because
    `OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]` are
    unquoted; a plain CSV reader splits header and rows alike, and the columns
    used here come first, so positions agree. Without a Patient ID column (the
    original experiment's final_data.csv) the patient comes from the image name.
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--csv {path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    rows, seen, skipped = [], set(), {"malformed_rows": 0, "duplicate_rows": 0}
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            lower = {h.lower(): i for i, h in reversed(list(enumerate(header)))}
            missing = [c for c in (IMAGE_COLUMN, LABELS_COLUMN) if c.lower() not in lower]
            if missing:
                shown = ", ".join(header[:6]) + (", ..." if len(header) > 6 else "") if header else "nothing"
                raise CLIError(f"--csv {path} lacks column(s) {', '.join(repr(m) for m in missing)} "
                               f"(found: {shown}); expected the NIH Data_Entry_2017 CSV")
            i_img, i_lab = lower[IMAGE_COLUMN.lower()], lower[LABELS_COLUMN.lower()]
            i_pat = lower.get(PATIENT_COLUMN.lower())
            for fields in reader:
                if not fields:
                    continue
                image = fields[i_img].strip() if len(fields) > max(i_img, i_lab) else ""
                if not image:
                    skipped["malformed_rows"] += 1
                    continue
                if image in seen:
                    skipped["duplicate_rows"] += 1
                    continue
                seen.add(image)
                patient = fields[i_pat].strip() if i_pat is not None and len(fields) > i_pat else ""
                rows.append(Row(image, fields[i_lab].strip(), patient or patient_from_image(image)))
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:  # a damaged (not only truncated) gzip stream
        raise CLIError(f"--csv {path}: its gzip data is damaged ({e}); download it again") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CLIError(f"--csv {path} is not a readable CSV file: {e}") from e
    if not rows:
        raise CLIError(f"--csv {path} has no data rows")
    return rows, skipped


def class_of(labels: str, infiltration_only: bool = False) -> str | None:
    """infiltration, no_finding, or None (another finding) for a Finding Labels value."""
    findings = [s.strip() for s in labels.split("|")]
    if findings == ["No Finding"]:
        return "no_finding"
    if infiltration_only:
        return "infiltration" if findings == ["Infiltration"] else None
    return "infiltration" if "Infiltration" in findings else None


def index_images(root: str | os.PathLike, exclude: Path | None = None) -> dict[str, Path]:
    """File name -> path of every image under root, searched recursively (the
    release unpacks as images_001/images/*.png ... images_012/...). `exclude`
    (the output folder) is skipped, since its PNGs carry the same names."""
    root = Path(root)
    if not root.is_dir():
        raise CLIError(f"--images {root}: {'not a folder' if root.exists() else 'folder not found'}")
    exclude = exclude.resolve() if exclude is not None else None
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.setdefault(name, here / name)
    if not found:
        raise CLIError(f"--images {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in it or its subfolders")
    return found


def read_test_list(path: str | os.PathLike) -> set[str]:
    """Image names, one per line (NIH's test_list.txt)."""
    path = Path(path)
    try:
        names = {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--official-test-list {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    if not names:
        raise CLIError(f"--official-test-list {path} is empty")
    return names


# --------------------------------------------------------------------------- selection and split


def split_patients(patients: dict[str, int], rng: np.random.Generator,
                   fractions: dict[str, float]) -> dict[str, str]:
    """Assign each patient (-> its image count) to a split so that the splits hold
    about `fractions` of the images. Patients are shuffled (sorted first, so the
    result depends only on the seed, not on CSV order) and cut where the running
    image count crosses each fraction, judged at the patient's midpoint."""
    order = sorted(patients, key=lambda p: (len(p), p))
    order = [order[i] for i in rng.permutation(len(order))]
    total = sum(patients.values())
    names, bounds = list(fractions), np.cumsum(list(fractions.values())) / sum(fractions.values())
    assignment, done = {}, 0
    for p in order:
        mid = (done + patients[p] / 2) / total
        assignment[p] = names[min(int(np.searchsorted(bounds, mid, side="right")), len(names) - 1)]
        done += patients[p]
    return assignment


def split_caps(per_class: int | None) -> dict[str, int | None]:
    """--per-class N spread over the splits 70/10/20 (rounded; the test split takes the remainder)."""
    if per_class is None:
        return {s: None for s in SPLITS}
    train, val = round(per_class * SPLIT_FRACTIONS["train"]), round(per_class * SPLIT_FRACTIONS["validation"])
    return {"train": train, "validation": val, "test": per_class - train - val}


def plan(rows: list[Row], cfg: ExtractConfig, on_disk: dict[str, Path] | None,
         test_list: set[str] | None) -> tuple[list[tuple[Row, str, str]], dict]:
    """Select, split and balance. Returns [(row, class, split)] sorted by image
    name, and the summary so far (candidates, skipped counts)."""
    skipped = {"other_findings": 0, "not_on_disk": 0, "patient_in_official_test": 0, "balancing": 0,
               "per_class_cap": 0}
    candidates = []
    for r in sorted(rows, key=lambda r: r.image):
        cls = class_of(r.labels, cfg.infiltration_only)
        if cls is None:
            skipped["other_findings"] += 1
        else:
            candidates.append((r, cls))
    counts = {c: sum(cls == c for _, cls in candidates) for c in CLASSES}
    absent = [CLASS_LABELS[c] + (" as the only label" if c == "infiltration" and cfg.infiltration_only else "")
              for c in CLASSES if not counts[c]]
    if absent:  # the CSV's labels, not --images, are the problem: say what they are
        found = ", ".join(repr(labels) for labels, _ in Counter(r.labels for r in rows).most_common(3))
        raise CLIError(f"--csv {cfg.csv} has no row labelled {' or '.join(absent)}; Finding Labels are "
                       f"case-sensitive, and the most common ones found are {found}")
    if on_disk is not None:
        present = [(r, c) for r, c in candidates if r.image in on_disk]
        skipped["not_on_disk"] = len(candidates) - len(present)
        for c in CLASSES:
            if not any(cls == c for _, cls in present):
                raise CLIError(f"none of the {counts[c]:,} {c} candidate images named in {cfg.csv} is under "
                               f"--images {cfg.images}")
        candidates = present

    rng = np.random.default_rng(cfg.seed)
    if test_list is not None:
        # The official list defines test; a patient with any image there must not appear in train/validation.
        test_patients = {r.patient for r, _ in candidates if r.image in test_list}
        kept = [(r, c) for r, c in candidates if r.image in test_list or r.patient not in test_patients]
        skipped["patient_in_official_test"] = len(candidates) - len(kept)
        candidates = kept
        rest = {}
        for r, _ in candidates:
            if r.image not in test_list:
                rest[r.patient] = rest.get(r.patient, 0) + 1
        fractions = {s: SPLIT_FRACTIONS[s] for s in ("train", "validation")}
        assignment = split_patients(rest, rng, fractions)
        split_of = lambda r: "test" if r.image in test_list else assignment[r.patient]  # noqa: E731
    else:
        per_patient = {}
        for r, _ in candidates:
            per_patient[r.patient] = per_patient.get(r.patient, 0) + 1
        assignment = split_patients(per_patient, rng, SPLIT_FRACTIONS)
        split_of = lambda r: assignment[r.patient]  # noqa: E731

    # Balance inside each split by random subsampling, never by CSV order.
    caps = split_caps(cfg.per_class)
    selected = []
    for split in SPLITS:
        pools = {c: [r for r, cls in candidates if cls == c and split_of(r) == split] for c in CLASSES}
        smaller = min(len(p) for p in pools.values())
        keep = smaller if caps[split] is None else min(smaller, caps[split])
        for c, pool in pools.items():
            skipped["balancing"] += len(pool) - smaller
            skipped["per_class_cap"] += smaller - keep
            for i in sorted(rng.choice(len(pool), size=keep, replace=False)):
                selected.append((pool[i], c, split))
    selected.sort(key=lambda t: t[0].image)
    summary = {"source": "nih", "csv": str(cfg.csv), "images": str(cfg.images) if cfg.images else None,
               "out": str(cfg.out) if cfg.out else None, "size": cfg.size, "seed": cfg.seed,
               "per_class": cfg.per_class, "infiltration_rule": "only label" if cfg.infiltration_only else "any label",
               "official_test_list": str(cfg.official_test_list) if cfg.official_test_list else None,
               "dry_run": cfg.dry_run, "rows": len(rows), "candidates": counts, "skipped": skipped}
    return selected, summary


def rebalance(entries: list[Entry], failed: list[Entry], rng: np.random.Generator) -> tuple[list[Entry], int]:
    """After unreadable files drop out, drop as many random images of the other
    class in the same split, so every split stays balanced. Returns the entries
    kept and how many were dropped for balance."""
    bad = {e.image for e in failed}
    kept = [e for e in entries if e.image not in bad]
    dropped = set()
    for split in SPLITS:
        n = {c: sum(e.split == split and e.cls == c for e in kept) for c in CLASSES}
        target = min(n.values())
        for c in CLASSES:
            pool = [e for e in kept if e.split == split and e.cls == c]
            for i in rng.choice(len(pool), size=n[c] - target, replace=False):
                dropped.add(pool[i].image)
    return [e for e in kept if e.image not in dropped], len(dropped)


# --------------------------------------------------------------------------- the whole extraction


def run(cfg: ExtractConfig) -> dict:
    """Extract (or, with cfg.dry_run, only plan) the data set, or write cfg.phantoms
    phantoms; returns the summary (also written to OUT/summary.json)."""
    if cfg.phantoms is not None:
        return phantoms.write_phantoms(cfg.phantoms, cfg.out, cfg.size, cfg.seed, cfg.workers, cfg.progress)
    rows, bad_rows = read_metadata(cfg.csv)
    test_list = read_test_list(cfg.official_test_list) if cfg.official_test_list is not None else None
    out = check_output(cfg.out, "--out", folder=True) if cfg.out is not None else None  # fail early if it's a file
    on_disk = index_images(cfg.images, exclude=out) if cfg.images is not None else None
    selected, summary = plan(rows, cfg, on_disk, test_list)
    summary["skipped"] = {**bad_rows, **summary["skipped"], "unreadable": 0}
    entries = [Entry(entry_path(split, cls, Path(r.image).stem), cls, split, r.patient,
                     str(on_disk[r.image]) if on_disk else r.image,
                     (read_resized, str(on_disk[r.image]) if on_disk else r.image))
               for r, cls, split in selected]
    if cfg.dry_run:
        return {**summary, **count_layout(entries)}
    if not entries:
        raise CLIError(f"nothing to write: no split of --csv {cfg.csv} has images of both classes after the "
                       f"patient split (too few patients)")

    previous = open_out_dir(out, entries)  # created only now, after every check on the inputs and on OUT
    status, failed = render_entries(entries, out, cfg.size, cfg.workers, cfg.progress, previous)
    if failed:
        entries, dropped = rebalance(entries, [e for e, _ in failed], np.random.default_rng([cfg.seed, 1]))
        summary["skipped"]["unreadable"] = len(failed)
        summary["skipped"]["balancing"] += dropped
        summary["unreadable_files"] = [e.source for e, _ in failed]
    summary.update(count_layout(entries), written=status["written"], reused=status["reused"])
    return finish_layout(out, entries, summary)


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    lines = []
    cand = summary.get("candidates")
    if cand:
        lines.append("candidates: " + ", ".join(f"{c} {n:,}" for c, n in cand.items()))
    lines.append(f"{'split':<12}{'infiltration':>14}{'no_finding':>12}{'patients':>10}")
    for s in SPLITS:
        c = summary["counts"][s]
        lines.append(f"{s:<12}{c['infiltration']:>14,}{c['no_finding']:>12,}{summary['patients'][s]:>10,}")
    skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
    if skipped:
        lines.append("skipped rows: " + "; ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in skipped.items()))
    if summary.get("dry_run"):
        lines.append(f"dry run: {summary['total']:,} images selected, nothing written")
    else:
        out = summary["out"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # printable, any name
        lines.append(f"{summary['total']:,} images in {out} ({summary.get('written', 0):,} written, "
                     f"{summary.get('reused', 0):,} reused, {summary.get('removed_stale', 0):,} stale removed)")
    return "\n".join(lines)
