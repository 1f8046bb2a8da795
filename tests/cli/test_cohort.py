"""`wsss predict-wsi` on cohorts: slide lists, manifests and bad inputs; per-slide failures recorded;
sharding across --shard jobs and torchrun ranks (every slide exactly once, the same table); resume
after a kill mid-slide (byte-identical outputs); slide locks; `wsss cohort-summary`.

Slides are tiny tiled TIFFs written here (192 × 128 px, 0.5 µm/px, tissue in a different place in
each); the model is an untrained tiny DeepLab "trained at 32 px", so 64-px windows are halved.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from helpers import assert_one_line_error, dead_pid, run_cli, spy_on_models, tiny_checkpoint
from wsss.errors import WsssError
from wsss.wsi import cohort as C
from wsss.runs import lock as K

TILE, OVERLAP = 64, 16  # 192 × 128: window columns 0, 48, 96, 128; rows 0, 48, 64 (12 windows)
SEED_OF = {"a": 1, "b": 2, "c": 3, "e": 5, "f": 6}  # "d" is the corrupt one


def _pixels(seed: int) -> np.ndarray:
    """Glass with a saturated pink-purple blob whose place and size depend on ``seed``."""
    rng = np.random.default_rng(seed)
    image = (240 + rng.integers(-3, 4, (128, 192, 3))).astype(np.uint8)
    y0, x0 = rng.integers(0, 60), rng.integers(0, 110)
    image[y0 : y0 + 60, x0 : x0 + 80] = rng.integers(0, 60, (60, 80, 3)) + np.array([150, 30, 130])
    return image


def write_slide(path: Path, image: np.ndarray, mpp: float | None = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib", **res)
    return path


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    """Six slides, one of them (d.tif) corrupt, some in a subfolder (folders are searched recursively)."""
    root = tmp_path_factory.mktemp("cohort") / "slides"
    for name, seed in SEED_OF.items():
        write_slide(root / ("sub" if name in "ef" else "") / f"{name}.tif", _pixels(seed))
    (root / "d.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a TIFF header, then garbage
    (root / "notes.txt").write_text("not a slide")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cohort_ckpt") / "s2.pth", 2)


def _args(inputs, ckpt, out, *extra) -> tuple:
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return ("predict-wsi", *inputs, "--checkpoint", ckpt, "--out", out, "--tile", TILE, "--overlap", OVERLAP,
            "--device", "cpu", "--batch-size", 3, "--geojson", *extra)


def _table(path: Path, without=("seconds",)) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in without} for row in csv.DictReader(f)]


def _slides(folder: Path) -> list[str]:
    return [str(p) for p in sorted([*folder.glob("*.tif"), *folder.glob("sub/*.tif")])]


# --------------------------------------------------------------------------- which slides, which share


def test_collect_slides_from_folders_files_and_manifests(cohort_dir, tmp_path):
    out = cohort_dir / "out"  # inside the searched folder: its label images are not slides
    write_slide(out / "a" / "a_mask.ome.tif", _pixels(9))
    jobs = C.collect_slides([cohort_dir], out)
    assert [j.path.relative_to(cohort_dir).as_posix() for j in jobs] == ["a.tif", "b.tif", "c.tif", "d.tif",
                                                                          "sub/e.tif", "sub/f.tif"]
    assert [(j.name, j.out) for j in jobs[:2]] == [("a", out / "a"), ("b", out / "b")]
    # an earlier run's outputs written into another folder inside the searched one: recorded as ours in
    # that folder's manifest, so not slides either; a user's TIFF beside them is
    from wsss.runs.owner import owned_folder

    earlier = cohort_dir / "earlier"
    with owned_folder(earlier, "predict-wsi") as owner:
        write_slide(earlier / "b_mask.ome.tif", _pixels(9))
        owner.record(earlier / "b_mask.ome.tif")
    write_slide(earlier / "g.tif", _pixels(10))
    jobs = C.collect_slides([cohort_dir], out)
    assert [j.path.relative_to(cohort_dir).as_posix() for j in jobs] == ["a.tif", "b.tif", "c.tif", "d.tif",
                                                                          "earlier/g.tif", "sub/e.tif", "sub/f.tif"]
    with pytest.raises(WsssError, match="is the output folder or inside it"):
        C.collect_slides([out], out)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,mpp,roi,note\n{cohort_dir / 'a.tif'},0.25,\"0,0,100,50\",x\n../m_rel/b.tif,,,\n")
    write_slide(tmp_path.parent / "m_rel" / "b.tif", _pixels(2))
    a, b = C.collect_slides([manifest], tmp_path / "o")
    assert (a.mpp, a.roi, b.mpp, b.roi) == (0.25, (0, 0, 100, 50), None, None)
    assert b.path == tmp_path / "../m_rel/b.tif"
    import shutil

    shutil.rmtree(out)
    shutil.rmtree(earlier)


def test_bad_cohort_inputs_end_in_one_clear_line(cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_path.csv").write_text("slide,mpp\na.tif,0.5\n")
    (tmp_path / "bad_mpp.csv").write_text(f"path,mpp\n{cohort_dir / 'a.tif'},-1\n")
    (tmp_path / "bad_roi.csv").write_text(f"path,roi\n{cohort_dir / 'a.tif'},\"1,2,3\"\n")
    (tmp_path / "missing.csv").write_text("path\nnowhere.tif\n")
    write_slide(tmp_path / "other" / "a.tif", _pixels(1))
    out = tmp_path / "out"
    cases = [
        ([tmp_path / "empty"], (), "holds no slides (.svs, .tif"),
        ([tmp_path / "no_path.csv"], (), "has no 'path' column (columns: slide, mpp)"),
        ([tmp_path / "bad_mpp.csv"], (), "line 2: mpp must be a positive number"),
        ([tmp_path / "bad_roi.csv"], (), "line 2: roi must be x,y,w,h"),
        ([tmp_path / "missing.csv"], (), "line 2: slide not found"),
        ([cohort_dir / "a.tif", cohort_dir], (), "a.tif is listed twice"),
        ([cohort_dir / "a.tif", tmp_path / "other" / "a.tif"], (), "would both be written to"),
        ([cohort_dir], ("--shard", "3/2"), "--shard 3/2: the index comes first, then the number of shards"),
        ([cohort_dir], ("--shard", "2/2"), "--shard 2/2: shard indices run from 0 to 1"),
        ([cohort_dir], ("--shard", "1of2"), "--shard must be I/N"),
        ([cohort_dir], ("--geojson-mode", "per-slide"), "--geojson-mode must be one of per-class, per-region"),
    ]
    for inputs, extra, message in cases:
        code, _, err = run_cli(capsys, monkeypatch, *_args(inputs, ckpt, out, *extra))
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not out.exists()
    for folder, message in ((tmp_path / "empty", "holds no cohort tables"), (out, "is not a folder")):
        code, _, err = run_cli(capsys, monkeypatch, "cohort-summary", folder)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_shards_from_options_and_slurm():
    assert C.parse_shard("1/3", {}) == (1, 3) and C.parse_shard(" 0 / 1 ", {}) == (0, 1)
    assert C.parse_shard(None, {}) is None
    assert C.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    # --array=1-4: tasks 1..4 are shards 0..3; --array=0-12:4: tasks 0, 4, 8, 12
    slurm = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert C.parse_shard(None, slurm) == (3, 4)
    assert C.parse_shard(None, {**slurm, "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0",
                                "SLURM_ARRAY_TASK_STEP": "4"}) == (2, 4)
    assert C.parse_shard("0/2", slurm) == (0, 2)  # the option wins
    with pytest.raises(WsssError, match="SLURM array task 9 .* is not one of 4 shards; pass --shard I/N"):
        C.parse_shard(None, {**slurm, "SLURM_ARRAY_TASK_ID": "9"})
    with pytest.raises(WsssError, match="the number of shards must be at least 1"):
        C.parse_shard("0/0", {})


def test_every_slide_goes_to_exactly_one_worker():
    jobs = [C.SlideJob(Path(f"s{i}.tif"), Path("o"), f"s{i}") for i in range(11)]
    workers = [C.worker_from_env((shard, 3), {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
               for shard in range(3) for rank in range(2)]
    assert sorted(w.index for w in workers) == list(range(6)) and {w.count for w in workers} == {6}
    shares = [w.share(jobs) for w in workers]
    taken = [job.name for share in shares for job in share]
    assert sorted(taken) == sorted(job.name for job in jobs) and len(taken) == len(set(taken))
    # shard 1 of 3, rank 1 of 2: worker 3 of 6 takes slides 3 and 9 (on GPU LOCAL_RANK 1)
    assert [j.name for j in workers[3].share(jobs)] == ["s3", "s9"] and workers[3].local_rank == 1


# --------------------------------------------------------------------------- one run, shards, ranks


def test_one_run_two_shards_and_two_torchrun_ranks_give_the_same_cohort_table(
        cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    # one process: the corrupt slide is recorded, the five others are done, exit status 1
    code, stdout, err = run_cli(capsys, monkeypatch, *_args(cohort_dir, ckpt, tmp_path / "one"))
    assert code == 1 and "single process: 6 slides: 5 done, 1 failed" in stdout
    assert "d.tif: failed:" in err and "holds no image" in err and "error:" not in err
    table = _table(tmp_path / "one" / "cohort.csv")
    assert [row["slide"] for row in table] == _slides(cohort_dir)
    assert [row["status"] for row in table] == ["done"] * 3 + ["failed"] + ["done"] * 2
    assert list(table[0]) == ["slide", "status", "tiles", "TE_um2", "TE_fraction", "NEC_um2", "NEC_fraction",
                              "LYM_um2", "LYM_fraction", "TAS_um2", "TAS_fraction", "background_um2",
                              "background_fraction", "error"]
    for row in table:
        if row["status"] == "done":
            name = Path(row["slide"]).stem
            summary = json.loads((tmp_path / "one" / name / f"{name}_summary.json").read_text())
            assert row["tiles"] == str(summary["tiles"]["segmented"]) and row["error"] == ""
            for cls, entry in summary["classes"].items():  # 192 × 128 px of 0.25 µm² each
                assert float(row[f"{cls}_um2"]) == pytest.approx(entry["pixels"] * 0.25, abs=1e-3)
                assert float(row[f"{cls}_fraction"]) == pytest.approx(entry["pixels"] / (192 * 128), abs=1e-6)
            assert sorted(p.name for p in (tmp_path / "one" / name).iterdir() if not p.name.startswith(".")) == sorted(
                [f"{name}.geojson", f"{name}_mask.png", f"{name}_overlay.png", f"{name}_summary.json"])
    assert "holds no image" in table[3]["error"]

    # two array jobs, in turn (as a cluster might run them): each writes its part, the second merges
    calls: list[str] = []
    run_slide = C.run_slide

    def counting(job, *args, **kw):
        calls.append(job.name)
        return run_slide(job, *args, **kw)

    monkeypatch.setattr(C, "run_slide", counting)
    shards = tmp_path / "shards"
    code, stdout, _ = run_cli(capsys, monkeypatch, *_args(cohort_dir, ckpt, shards, "--shard", "0/2"))
    assert code == 0 and "shard 0/2: 3 of the cohort's 6 slides: 3 done, 0 failed" in stdout  # a, c, e
    assert not (shards / "cohort.csv").exists()  # shard 1 has not run yet
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the second job takes its shard from SLURM
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    code, stdout, _ = run_cli(capsys, monkeypatch, *_args(cohort_dir, ckpt, shards))
    assert code == 1 and "shard 1/2: 3 of the cohort's 6 slides: 2 done, 1 failed" in stdout  # b, d, f
    assert "merged into" in stdout
    assert sorted(calls) == ["a", "b", "c", "d", "e", "f"]  # every slide exactly once
    parts = [_table(shards / f"cohort-part-{i}-of-2.csv") for i in range(2)]
    assert [r["slide"] for r in parts[0]] == _slides(cohort_dir)[0::2]
    assert [r["slide"] for r in parts[1]] == _slides(cohort_dir)[1::2]
    assert _table(shards / "cohort.csv") == table
    assert not list(shards.glob("*/.wsss-lock*")) and not list(shards.glob(".cohort-merge.lock"))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")

    # `wsss cohort-summary` merges the parts the same way (and says that one slide failed)
    (shards / "cohort.csv").unlink()
    code, stdout, err = run_cli(capsys, monkeypatch, "cohort-summary", shards)
    assert code == 1 and "6 slides: 5 done, 1 failed, 0 locked" in stdout and "d.tif: failed" in err
    assert _table(shards / "cohort.csv") == table

    # two torchrun ranks on the CPU
    ranks = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss",
           *map(str, _args(cohort_dir, ckpt, ranks)[0:])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # The rank with the corrupt slide records it and ends with status 0: torchrun stops every other rank
    # as soon as one exits non-zero (rank 0, slower under load, was killed before its summary).
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: 3 of the cohort's 6 slides" in proc.stdout and "rank 1/2: 3 of the cohort's 6" in proc.stdout
    assert "rank 1/2: exit status 0 under torchrun" in proc.stderr and "rank 0/2: exit status" not in proc.stderr
    assert sum(f"{name}.tif: " in proc.stderr and "tiles segmented" in proc.stderr for name in "abcef") == 5
    for name in "abcef":  # each slide segmented by one rank only
        assert proc.stderr.count(f"{name}.tif: ") == 1, proc.stderr[-2000:]
    assert _table(ranks / "cohort.csv") == table
    code, stdout, _ = run_cli(capsys, monkeypatch, "cohort-summary", ranks)  # the cohort's status
    assert code == 1 and "6 slides: 5 done, 1 failed" in stdout
    for name in "abcef":  # and the outputs are those of the single run
        for suffix in ("_mask.png", ".geojson"):
            assert (ranks / name / f"{name}{suffix}").read_bytes() == (tmp_path / "one" / name / f"{name}{suffix}").read_bytes()


# --------------------------------------------------------------------------- failures, re-runs, resume


def test_slides_that_fail_are_recorded_and_the_others_done(ckpt, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "slides"
    write_slide(folder / "good.tif", _pixels(1))
    write_slide(folder / "glass.tif", np.full((128, 192, 3), 236, dtype=np.uint8))
    write_slide(folder / "nompp.tif", _pixels(2), mpp=None)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, *_args(folder, ckpt, out, "--mpp", 1.0))
    assert code == 1 and "3 slides: 1 done, 2 failed" in stdout
    rows = {Path(r["slide"]).name: r for r in _table(out / "cohort.csv")}
    assert rows["good.tif"]["status"] == "done"
    assert rows["glass.tif"]["status"] == "failed" and "no colour" in rows["glass.tif"]["error"]
    assert rows["nompp.tif"]["status"] == "failed" and "does not record" in rows["nompp.tif"]["error"]
    assert not (out / "glass" / "glass_partial").exists()
    # a manifest gives the slide its µm/px; the finished slide is skipped, the failed ones retried
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,mpp\nslides/good.tif,\nslides/glass.tif,\nslides/nompp.tif,0.5\n")
    calls = []
    run_slide = C.run_slide
    monkeypatch.setattr(C, "run_slide", lambda job, *a, **k: calls.append(job.name) or run_slide(job, *a, **k))
    code, stdout, _ = run_cli(capsys, monkeypatch, *_args(manifest, ckpt, out, "--mpp", 1.0))
    assert code == 1 and "3 slides: 2 done, 1 failed" in stdout and calls == ["glass", "nompp"]
    summary = json.loads((out / "nompp" / "nompp_summary.json").read_text())
    assert summary["mpp"] == [1.0, 1.0] and summary["size"] == [96, 64]  # level 0 at 0.5 µm/px, halved


def test_a_cohort_killed_mid_slide_resumes_to_the_same_outputs(cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    spies, spy_load = spy_on_models(monkeypatch, C)

    slides = [cohort_dir / f"{n}.tif" for n in "abc"]
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(slides, ckpt, tmp_path / "once", "--min-tissue", 0))[0] == 0
    # batch 3, 4 windows a row: groups of 1 row (4 windows: batches of 3 and 1), 3 rows: 6 passes a slide
    assert spies[-1].calls == 18
    out = tmp_path / "out"
    spy_load(6 + 3)  # slide b, third pass: its first row is written, the second not
    code, _, _ = run_cli(capsys, monkeypatch, *_args(slides, ckpt, out, "--min-tissue", 0))
    assert code == 130
    assert json.loads((out / "b" / "b_partial" / "state.json").read_text())["state"]["rows_done"] == 1
    # what a SIGKILL leaves behind: the lock of a process that no longer runs, on this host
    (out / "b" / ".wsss-lock.b").write_text(json.dumps({"host": K.HOST, "pid": dead_pid(), "proc_start": None}))
    spy_load(None)
    code, stdout, _ = run_cli(capsys, monkeypatch, *_args(slides, ckpt, out, "--min-tissue", 0))
    assert code == 0 and "3 slides: 3 done, 0 failed" in stdout
    # a skipped (finished), b from its row 0 again (row 1 needs it: 0 + 64 > 48), c whole
    assert spies[-1].calls == 6 + 6
    for name in "abc":
        for suffix in ("_mask.png", "_overlay.png", ".geojson"):
            assert (out / name / f"{name}{suffix}").read_bytes() == (tmp_path / "once" / name / f"{name}{suffix}").read_bytes()
        summaries = [json.loads((o / name / f"{name}_summary.json").read_text()) for o in (out, tmp_path / "once")]
        for s in summaries:
            del s["seconds"]
        assert summaries[0] == summaries[1]
        assert not (out / name / f".wsss-lock.{name}").exists()
    assert _table(out / "cohort.csv") == _table(tmp_path / "once" / "cohort.csv")
    # run again: everything finished, nothing segmented
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(slides, ckpt, out, "--min-tissue", 0))[0] == 0
    assert spies[-1].calls == 0
    # other options: the slides are segmented again
    assert run_cli(capsys, monkeypatch, *_args(slides, ckpt, out, "--min-tissue", 0, "--overlap", 8))[0] == 0
    assert spies[-1].calls > 0


def test_a_slide_whose_outputs_are_the_users_fails_and_the_others_go_on(cohort_dir, ckpt, tmp_path, capsys,
                                                                        monkeypatch):
    spies, spy_load = spy_on_models(monkeypatch, C)
    out = tmp_path / "out"
    mine = out / "a" / "a_overlay.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own overlay")
    slides = [cohort_dir / f"{n}.tif" for n in "ab"]
    args = _args(slides, ckpt, out, "--min-tissue", 0)
    spy_load(None)
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1 and "2 slides: 1 done, 1 failed" in stdout and "error:" not in err
    rows = {Path(r["slide"]).stem: r for r in _table(out / "cohort.csv")}
    assert rows["a"]["status"] == "failed" and rows["b"]["status"] == "done"
    assert f"{mine} exists and was not written by wsss" in rows["a"]["error"] and "--force" in rows["a"]["error"]
    assert mine.read_bytes() == b"the user's own overlay"
    assert sorted(p.name for p in mine.parent.iterdir()) == ["a_overlay.png"]  # nothing else written, unlocked
    assert spies[-1].calls == 6  # slide b's 6 passes (4 windows a row, 3 rows, batches of 3): none for a

    # slide b's folder: its manifest records what it wrote, as it is on disk
    lines = [json.loads(line) for line in (out / "b" / ".wsss-manifest.jsonl").read_text().splitlines()]
    files = {line["file"]: line for line in lines if "file" in line}
    assert sorted(files) == ["b.geojson", "b_mask.png", "b_overlay.png", "b_summary.json"]
    for name, record in files.items():
        st = (out / "b" / name).stat()
        assert (record["size"], record["mtime_ns"]) == (st.st_size, st.st_mtime_ns)

    # --force replaces the user's file (b is finished: skipped)
    code, stdout, _ = run_cli(capsys, monkeypatch, *args, "--force")
    assert code == 0 and "2 slides: 2 done, 0 failed" in stdout and spies[-1].calls == 6
    assert mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # other options, without --force: every output is one wsss wrote, both slides are segmented again
    segmented = []
    run_slide = C.run_slide
    monkeypatch.setattr(C, "run_slide", lambda job, *a, **k: segmented.append(job.name) or run_slide(job, *a, **k))
    code, stdout, _ = run_cli(capsys, monkeypatch, *args, "--overlap", 8)
    assert code == 0 and "2 slides: 2 done, 0 failed" in stdout and segmented == ["a", "b"]
    # a finished slide whose output was edited since is not finished: its row fails (the file would be
    # replaced), and --force segments it again
    (out / "b" / "b_mask.png").write_bytes(b"edited")
    segmented.clear()
    code, stdout, _ = run_cli(capsys, monkeypatch, *args, "--overlap", 8)
    rows = {Path(r["slide"]).stem: r for r in _table(out / "cohort.csv")}
    assert code == 1 and "2 slides: 1 done, 1 failed" in stdout and (out / "b" / "b_mask.png").read_bytes() == b"edited"
    assert rows["b"]["status"] == "failed" and "b_mask.png exists and was not written by wsss" in rows["b"]["error"]
    segmented.clear()
    code, stdout, _ = run_cli(capsys, monkeypatch, *args, "--overlap", 8, "--force")
    assert code == 0 and "2 slides: 2 done, 0 failed" in stdout and segmented == ["b"]
    assert (out / "b" / "b_mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("table, extra", [("cohort.csv", ()), ("cohort-part-0-of-2.csv", ("--shard", "0/2")),
                                          ("cohort.csv", ("--shard", "1/2"))])
def test_the_users_cohort_tables_are_not_replaced(cohort_dir, ckpt, tmp_path, capsys, monkeypatch, table, extra):
    """A table in OUT that wsss did not write stops the run before any slide (one line), unless --force;
    cohort-summary does not replace a user's cohort.csv either."""
    out = tmp_path / "out"
    out.mkdir()
    mine = out / table
    mine.write_text("the user's own table\n")
    args = _args([cohort_dir / f"{n}.tif" for n in "ab"], ckpt, out, "--min-tissue", 0, *extra)
    err = assert_one_line_error(capsys, monkeypatch, *args)
    assert f"{mine} exists and was not written by wsss" in err and "--force" in err
    assert mine.read_text() == "the user's own table\n" and not (out / "a").exists()
    code, _, err = run_cli(capsys, monkeypatch, *args, "--force")
    assert code == 0, err
    if table == "cohort.csv" and extra:  # shard 1 of 2 alone: its part table; cohort.csv once both are in
        assert (out / "cohort-part-1-of-2.csv").read_text().startswith("slide,")
    else:
        assert mine.read_text().startswith("slide,")


def test_tables_an_earlier_wsss_wrote_unrecorded_are_adopted(cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    """Before the cohort tables were recorded in OUT's manifest, wsss wrote them unrecorded: a rerun
    (the documented way to retry failed slides) takes them as its own, by their header."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cohort.csv").write_text("slide,status,seconds,tiles,TE_um2,TE_fraction,error\nx.tif,failed,0,0,,,gone\n")
    code, _, err = run_cli(capsys, monkeypatch, *_args([cohort_dir / f"{n}.tif" for n in "ab"], ckpt, out,
                                                       "--min-tissue", 0))
    assert code == 0, err
    assert [Path(r["slide"]).name for r in _table(out / "cohort.csv")] == ["a.tif", "b.tif"]


def test_cohort_summary_does_not_replace_the_users_table(cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, *_args([cohort_dir / "a.tif"], ckpt, out, "--shard", "0/2"))
    assert code == 0 and (out / "cohort-part-0-of-2.csv").is_file(), err
    mine = out / "cohort.csv"
    mine.write_text("the user's own table\n")
    err = assert_one_line_error(capsys, monkeypatch, "cohort-summary", out)
    assert f"{mine} exists and was not written by wsss" in err and "choose another OUT, or pass --force" in err
    assert mine.read_text() == "the user's own table\n"
    code, _, err = run_cli(capsys, monkeypatch, "cohort-summary", out, "--force")
    assert code == 0 and mine.read_text().startswith("slide,status,seconds,tiles,"), err


def test_a_slide_locked_by_a_live_process_is_left_alone(cohort_dir, ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    elsewhere = {"host": "node-17", "pid": 4242, "since": "2026-01-01 00:00:00"}
    (out / "a").mkdir(parents=True)
    (out / "a" / ".wsss-lock.a").write_text(json.dumps(elsewhere))
    code, stdout, err = run_cli(capsys, monkeypatch, *_args([cohort_dir / "a.tif", cohort_dir / "b.tif"], ckpt, out))
    assert code == 0 and "2 slides: 1 done, 0 failed, 1 locked by other processes" in stdout
    assert "a.tif: locked: " in err and "pid 4242 on node-17" in err and "another host" in err
    assert str(out / "a" / ".wsss-lock.a") in err and not (out / "a" / "a_summary.json").exists()
    assert json.loads((out / "a" / ".wsss-lock.a").read_text()) == elsewhere
