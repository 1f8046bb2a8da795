"""``wsss predict-wsi`` on a cohort: many slides in one run, split across torchrun ranks and cluster
array jobs, with one table of results.

Slides come from files, folders (searched recursively for the extensions OpenSlide and tifffile
read) or manifest CSVs (a ``path`` column; optional ``mpp``, the slide's level-0 µm/px for files
that do not record it, and ``roi``, ``x,y,w,h`` in level-0 pixels). Every process builds the same
list in the same order and takes every ``count``-th slide from its own index: the index and count
combine the shard of an array job (``--shard I/N``, or ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT``) with the rank of a torchrun job (``RANK`` / ``WORLD_SIZE``; its
``LOCAL_RANK`` picks the GPU). The processes never talk to each other: each works on its own
slides and holds each slide it works on (:func:`wsss.wsi.predict_wsi.owned_slide`: the lock
``OUT/<name>/.wsss-lock.<name>`` and the manifest of what wsss wrote there), so that two runs given
overlapping slides cannot segment one slide twice, and no file that wsss did not write is replaced.

Outputs in ``OUT/<name>/`` per slide (see :mod:`wsss.wsi.predict_wsi`), plus the cohort table:
``OUT/cohort.csv`` for a single process, rewritten (atomically) as each slide finishes; with
several, each writes ``OUT/cohort-part-<i>-of-<n>.csv`` and whichever finds every slide of the
cohort in the part tables when it ends merges them into ``cohort.csv`` (``wsss cohort-summary OUT``
does the same at any time). A slide whose summary records the fingerprint of this run's inputs and
options is finished: it is not segmented again, its row comes from that summary.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.inference import load_models, upgrade_settings
from wsss.runtime import atomic_path
from wsss.runs.lock import LockHeld, acquire
from wsss.runs.owner import Manifest, Owner, manifest_record, owned_folder
from wsss.wsi.slide import SLIDE_SUFFIXES, output_stem
from wsss.wsi.predict_wsi import (
    SlideJob, WsiConfig, finished_slide, owned_slide, run_slide, with_model_scale,
)

log = logging.getLogger(__name__)


TABLE = "cohort.csv"
PART_PATTERN = re.compile(r"cohort-part-(\d+)-of-(\d+)\.csv$")
MERGE_LOCK = ".cohort-merge.lock"
MERGE_WAIT = 120.0  # seconds; a merge takes well under one
STATUSES = ("done", "failed", "locked")


# --------------------------------------------------------------------------- which slides


def collect_slides(inputs: Sequence[Path], out: Path) -> list[SlideJob]:
    """The cohort: slide files, folders searched recursively and manifest CSVs, in the order given
    (a folder's slides sorted by path). The output folder is never searched. A missing path, a
    folder without slides, a bad manifest, a slide listed twice and two slides that would write
    the same output folder are user errors."""
    jobs: list[SlideJob] = []
    for path in map(Path, inputs):
        if path.is_dir():
            if path.resolve().is_relative_to(out.resolve()):
                raise WsssError(f"{path} is the output folder or inside it (--out {out}), where no slide is "
                                "searched; choose another --out")
            found = [SlideJob(p, out / output_stem(p), output_stem(p)) for p in folder_slides(path, out)]
            if not found:
                raise WsssError(f"{path} holds no slides ({', '.join(SLIDE_SUFFIXES)})")
        elif path.suffix.lower() == ".csv" and path.is_file():
            found = read_manifest(path, out)
        elif path.is_file():
            found = [SlideJob(path, out / output_stem(path), output_stem(path))]
        else:
            raise WsssError(f"slide not found: {path}")
        jobs.extend(found)
    _check_unique(jobs)
    return jobs


def folder_slides(folder: Path, out: Path) -> list[Path]:
    """The slide files under ``folder``, OUT and what wsss wrote (the label, probability and tissue
    OME-TIFFs of an earlier run into another folder, recorded in their folder's manifest) left out."""
    out = out.resolve()
    found, ours, manifests = [], 0, {}
    for p in folder.rglob("*"):
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(SLIDE_SUFFIXES):
            continue
        if p.resolve().is_relative_to(out):
            continue  # our own label images (OME-TIFF) when OUT is inside the folder
        if p.parent not in manifests:
            manifests[p.parent] = Manifest.read(p.parent)
        if manifest_record(manifests[p.parent], p.parent, p) is not None:
            ours += 1
            continue
        found.append(p)
    if ours:
        log.info("%s: %d image%s that wsss wrote left out", folder, ours, "s" if ours > 1 else "")
    return sorted(found)


def read_manifest(path: Path, out: Path) -> list[SlideJob]:
    """The slides of a manifest CSV: ``path`` (relative paths from the manifest's folder), and
    optionally ``mpp`` (the slide's level-0 µm/px), ``roi`` (``x,y,w,h``, level-0 pixels) and
    ``patient`` (``extract-patches`` keeps a patient's slides in one split)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [(c or "").strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsssError(f"cannot read manifest {path}: {exc}") from None
    if "path" not in columns:
        raise WsssError(f"manifest {path} has no 'path' column (columns: {', '.join(columns) or 'none'})")
    jobs = []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["path"]:
            raise WsssError(f"manifest {path}, line {line}: empty path")
        slide = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        if not slide.is_file():
            raise WsssError(f"manifest {path}, line {line}: slide not found: {slide}")
        jobs.append(SlideJob(slide, out / output_stem(slide), output_stem(slide), _mpp(row.get("mpp"), path, line),
                             _roi(row.get("roi"), path, line), row.get("patient") or None))
    if not jobs:
        raise WsssError(f"manifest {path} lists no slides")
    return jobs


def _mpp(text: str | None, path: Path, line: int) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise WsssError(f"manifest {path}, line {line}: mpp must be a positive number of µm per pixel, not {text!r}")
    return value


def _roi(text: str | None, path: Path, line: int) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        roi = tuple(int(v) for v in text.split(","))
    except ValueError:
        roi = ()
    if len(roi) != 4 or min(roi[:2]) < 0 or min(roi[2:]) < 1:
        raise WsssError(f"manifest {path}, line {line}: roi must be x,y,w,h (level-0 pixels), not {text!r}")
    return roi


def _check_unique(jobs: Sequence[SlideJob]) -> None:
    seen: dict[Path, SlideJob] = {}
    names: dict[str, SlideJob] = {}
    for job in jobs:
        key = job.path.resolve()
        if key in seen:
            raise WsssError(f"{job.path} is listed twice (as {seen[key].path} too); give every slide once")
        seen[key] = job
        other = names.setdefault(job.name, job)
        if other is not job:
            raise WsssError(f"{other.path} and {job.path} would both be written to {job.out}; rename one")


# --------------------------------------------------------------------------- which share


@dataclass(frozen=True)
class Worker:
    """This process's share of the cohort: every ``count``-th slide from ``index``."""

    shard: int = 0
    shards: int = 1
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def index(self) -> int:
        return self.shard * self.world + self.rank

    @property
    def count(self) -> int:
        return self.shards * self.world

    def share(self, jobs: Sequence[SlideJob]) -> list[SlideJob]:
        return list(jobs[self.index :: self.count])

    def describe(self) -> str:
        parts = []
        if self.shards > 1:
            parts.append(f"shard {self.shard}/{self.shards}")
        if self.world > 1:
            parts.append(f"rank {self.rank}/{self.world}")
        return ", ".join(parts) or "single process"


def parse_shard(text: str | None, env: dict | None = None) -> tuple[int, int] | None:
    """``--shard I/N`` (0 ≤ I < N), else the SLURM array task (its index counted from the array's
    first task, in steps of the array's step); None outside an array job."""
    env = os.environ if env is None else env
    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        except ValueError:
            raise WsssError("SLURM_ARRAY_TASK_* are not numbers; pass --shard I/N") from None
        index = (task - first) // step
        if not 0 <= index < count:
            raise WsssError(f"SLURM array task {task} (first {first}, step {step}) is not one of {count} shards; "
                            "pass --shard I/N")
        return index, count
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise WsssError(f"--shard must be I/N, this job's index I (from 0) of N shards, not {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise WsssError(f"--shard {text}: the number of shards must be at least 1")
    if index > count:
        raise WsssError(f"--shard {text}: the index comes first, then the number of shards (I/N, I < N)")
    if index == count:
        raise WsssError(f"--shard {text}: shard indices run from 0 to {count - 1}")
    return index, count


def worker_from_env(shard: tuple[int, int] | None, env: dict | None = None) -> Worker:
    """This process's :class:`Worker`: the shard, and torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", 0))
    except ValueError:
        raise WsssError("RANK, WORLD_SIZE or LOCAL_RANK is not a number") from None
    index, count = shard if shard is not None else (0, 1)
    return Worker(index, count, rank, world, local)


# --------------------------------------------------------------------------- the table


def table_columns(spec: DatasetSpec) -> list[str]:
    classes = [*spec.classes, "background"]
    per_class = [col for name in classes for col in (f"{name}_um2", f"{name}_fraction")]
    return ["slide", "status", "seconds", "tiles", *per_class, "error"]


def summary_row(job: SlideJob, summary: dict) -> dict:
    """A finished slide's row, from its summary."""
    row = {"slide": str(job.path), "status": "done", "seconds": f"{summary.get('seconds', 0.0):.1f}",
           "tiles": str(summary["tiles"]["segmented"]), "error": ""}
    for name, entry in summary["classes"].items():
        area = entry.get("area_um2")
        row[f"{name}_um2"] = "" if area is None else f"{area:.3f}"
        row[f"{name}_fraction"] = f"{entry['fraction']:.6f}"
    return row


def other_row(job: SlideJob, status: str, error: str, seconds: float = 0.0) -> dict:
    return {"slide": str(job.path), "status": status, "seconds": f"{seconds:.1f}", "tiles": "",
            "error": " ".join(error.split())}


def write_table(path: Path, rows: Sequence[dict], columns: Sequence[str], shared: Owner | None = None) -> None:
    """A cohort table, rows sorted by slide, written atomically (checked and recorded by the owner of
    its folder). ``shared``: ``cohort.csv`` of a sharded run, which another worker may have written
    since this one read the manifest: checked when the run began (:func:`claim_tables`), recorded here."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore", restval="")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["slide"]):
        writer.writerow(row)
    with atomic_path(path, owned=shared is None) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
        if shared is not None:
            shared.record(path, written=tmp)


TABLE_HEADER = "slide,status,seconds,tiles,"
"""How every cohort table wsss writes begins (:func:`table_columns`)."""


@contextmanager
def owned_tables(out: Path, command: str, tables: Sequence[Path], force: bool,
                 option: str = "--out") -> Iterator[Owner]:
    """Hold ``out``'s cohort tables for this process (a lock of their own: the workers of a sharded run
    share the folder) and refuse, before any work, to replace tables wsss did not write there. A table
    an earlier wsss wrote before the tables were recorded (its header is a cohort table's) is adopted."""
    scope = "tables-" + "-".join(p.stem for p in tables)  # not a slide's name (the slides' own locks)
    with owned_folder(out, command, key=f"{command} {scope}", force=force, scope=scope, option=option) as owner:
        for table in tables:
            if table.is_file() and not owner.ours(table) and _is_cohort_table(table):
                owner.record(table)
        owner.claim(tables, "cohort tables")
        yield owner


def _is_cohort_table(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(TABLE_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def part_name(worker: Worker) -> str:
    return f"cohort-part-{worker.index}-of-{worker.count}.csv"


def merge_parts(out: Path, count: int | None = None) -> tuple[list[str], dict[str, dict]]:
    """The rows of ``out``'s part tables (of ``count`` parts; None: all), one per slide: where
    several tables list a slide, the most recently written wins."""
    parts = [p for p in out.glob("cohort-part-*-of-*.csv")
             if (m := PART_PATTERN.fullmatch(p.name)) and (count is None or int(m[2]) == count)]
    columns: list[str] = []
    rows: dict[str, dict] = {}
    for part in sorted(parts, key=lambda p: (p.stat().st_mtime_ns, p.name)):
        cols, part_rows = read_table(part)
        columns = columns or cols
        for row in part_rows:
            rows[row["slide"]] = row
    return columns, rows


def summarise_folder(out: Path, force: bool = False) -> tuple[Path, list[dict]]:
    """``wsss cohort-summary OUT``: merge every part table into ``OUT/cohort.csv`` (or read it when
    there are none); returns it and its rows."""
    if not out.is_dir():
        raise WsssError(f"{out} is not a folder")
    table = out / TABLE
    columns, rows = merge_parts(out)
    if rows:
        with owned_tables(out, "cohort-summary", [table], force=force, option="OUT") as owner, \
                acquire(out / MERGE_LOCK, f"merging the tables of {out}", wait=MERGE_WAIT):
            columns, rows = merge_parts(out)
            write_table(table, list(rows.values()), columns, shared=owner)
    elif not table.is_file():
        raise WsssError(f"{out} holds no cohort tables ({TABLE} or cohort-part-*-of-*.csv)")
    return table, read_table(table)[1]


# --------------------------------------------------------------------------- the run


@dataclass
class CohortResult:
    """What this process did: one row per slide of its share; the table it wrote; whether the
    merged ``cohort.csv`` is complete."""

    worker: Worker
    rows: list[dict] = field(default_factory=list)
    table: Path | None = None
    merged: Path | None = None
    total: int = 0

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


def process(job: SlideJob, cfg: WsiConfig, predictor, spec: DatasetSpec, progress: bool) -> dict:
    """One slide of the share: skipped when finished, else its folder held (the slide's lock, the
    manifest: files there that wsss did not write are not replaced), segmented and written; its
    failure is its row's error, never the run's."""
    if (summary := finished_slide(job, cfg, spec)) is not None:
        log.info("%s: finished earlier, skipped", job.path)
        return summary_row(job, summary)
    try:
        with owned_slide(job, cfg) as owner:
            if (summary := finished_slide(job, cfg, spec)) is not None:  # finished while we looked
                return summary_row(job, summary)
            result = run_slide(job, cfg, predictor, spec, owner, progress)
    except LockHeld as exc:
        log.warning("%s", exc)
        return other_row(job, "locked", str(exc))
    except WsssError as exc:
        log.warning("%s failed: %s", job.path, exc)
        return other_row(job, "failed", str(exc))
    except Exception as exc:  # a corrupt file can fail in any library: recorded, the others go on
        log.warning("%s failed", job.path, exc_info=True)
        return other_row(job, "failed", f"{type(exc).__name__}: {exc}")
    s = result.summary
    log.info("%s: %d tiles segmented in %.1f s", job.path, s["tiles"]["segmented"], s["seconds"])
    return summary_row(job, s)


def run(cfg: WsiConfig, progress: bool = True, env: dict | None = None) -> CohortResult:
    """Segment this process's share of the cohort, writing the cohort table as slides finish."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise WsssError(f"--out {cfg.out} is a file; a folder is needed")
    jobs = collect_slides(cfg.inputs, cfg.out)
    cfg = with_model_scale(cfg)
    worker = worker_from_env(cfg.shard, env)
    mine = worker.share(jobs)
    log.info("%d slide%s in the cohort; %s takes %d", len(jobs), "" if len(jobs) == 1 else "s", worker.describe(),
             len(mine))
    predictor, spec = load_models(cfg, worker.local_rank)
    columns = table_columns(spec)
    result = CohortResult(worker, total=len(jobs))
    result.table = cfg.out / (TABLE if worker.count == 1 else part_name(worker))
    with owned_tables(cfg.out, "predict-wsi", list(dict.fromkeys([result.table, cfg.out / TABLE])), cfg.force) as owner:
        write_table(result.table, [], columns)  # a fresh table: rows of an earlier run are not this run's
        for job in mine:
            result.rows.append(process(job, cfg, predictor, spec, progress))
            write_table(result.table, result.rows, columns)
        result.merged = (result.table if worker.count == 1
                         else merge_if_complete(cfg.out, jobs, worker, columns, owner))
    return result


def merge_if_complete(out: Path, jobs: Sequence[SlideJob], worker: Worker, columns: Sequence[str],
                      owner: Owner) -> Path | None:
    """When the part tables of this run's ``count`` workers list every slide of the cohort, merge
    them into ``cohort.csv`` (under a lock, so that two workers finishing together cannot write an
    older view last); None while some worker is still going."""
    wanted = {str(job.path) for job in jobs}
    if not wanted <= set(merge_parts(out, worker.count)[1]):
        return None
    # Under a lock, re-reading the parts inside it: of two workers finishing together, the one
    # that writes last has read last.
    with acquire(out / MERGE_LOCK, f"merging the tables of {out}", wait=MERGE_WAIT, worker=worker.describe()):
        _, rows = merge_parts(out, worker.count)
        if not wanted <= set(rows):
            return None
        write_table(out / TABLE, [rows[s] for s in wanted], columns, shared=owner)
    return out / TABLE
