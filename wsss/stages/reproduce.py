"""The whole pipeline in one call (``wsss reproduce``, behind ``make reproduce``).

synthetic data (when asked) → train-stage1 + CAM evaluation → generate-pm → eval-pm (when
``DATA/train_gt`` exists) → train-stage2 with the gate → figures → one results table, written to
``REPORT/report.md`` and ``REPORT/report.json``.

Re-running continues where a previous run stopped: finished steps are recorded in
``REPORT/progress.json`` and skipped (their results and wall times are read back), an interrupted
training resumes from its last finished epoch, and pseudo-mask generation skips the masks already
written. The progress file also records the settings; a re-run with other settings stops with a
clear message instead of mixing results (``--force`` starts over).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wsss import config as cfglib
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config
from wsss.data.layout import default_pm_dir, train_gt_dir
from wsss.data.specs import DatasetSpec, get_spec
from wsss.errors import WsssError
from wsss.metrics import write_json
from wsss.runtime import atomic_path

log = logging.getLogger(__name__)

PM_LAYERS = ("b4_5", "b5_2", "bn7")
SYNTH_MARKER = "synth.json"


@dataclass(frozen=True)
class ReproduceConfig:
    dataset: str
    data: Path
    run: str  # names the checkpoint and report folders (e.g. "synthetic", "luad")
    preset: str | None = None  # "cpu" or None (the paper's settings)
    out: Path | None = None  # None: checkpoints/<run>
    report: Path | None = None  # None: results/<run>
    synth: bool = False  # generate the synthetic dataset into DATA first (skipped when it is there)
    synth_counts: tuple[int, int, int] = (1000, 100, 100)
    stage1_init: Path | None = None
    stage2_init: Path | None = None
    device: str = "auto"
    workers: int | None = None
    ablations: bool = False
    figures: bool = True
    force: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("checkpoints") / self.run

    @property
    def report_dir(self) -> Path:
        return Path(self.report) if self.report is not None else Path("results") / self.run

    def signature(self) -> dict:
        """What the results depend on (not how or where they are computed)."""
        return {"dataset": get_spec(self.dataset).name, "data": str(self.data), "preset": self.preset,
                "stage1_init": _str(self.stage1_init), "stage2_init": _str(self.stage2_init)}


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


# --------------------------------------------------------------------------- progress bookkeeping


@dataclass
class Progress:
    """``REPORT/progress.json``: finished steps with their wall time and results."""

    path: Path
    signature: dict
    steps: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, signature: dict, force: bool) -> "Progress":
        if force or not path.is_file():
            return cls(path, signature)
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("%s is unreadable: starting the bookkeeping afresh", path)
            return cls(path, signature)
        if saved.get("signature") != signature:
            raise WsssError(
                f"{path} records a run with other settings ({_diff(saved.get('signature') or {}, signature)}); "
                "pass --force to start over, or choose another --report / --out"
            )
        return cls(path, signature, saved.get("steps", {}))

    def done(self, step: str) -> dict | None:
        return self.steps.get(step)

    def finish(self, step: str, seconds: float, result: dict | None = None) -> None:
        self.steps[step] = {"seconds": round(seconds, 1), "result": result}
        write_json(self.path, {"signature": self.signature, "steps": self.steps})


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys) or "unknown"


def _run_step(progress: Progress, times: dict[str, dict], step: str, title: str, fn: Callable[[], dict | None],
              outputs: tuple[Path, ...] = ()) -> dict | None:
    """Run ``fn`` unless ``step`` is recorded as finished and its ``outputs`` still exist; returns its
    result. ``times[title]`` gets the wall time (that of the earlier run for a skipped step)."""
    record = progress.done(step)
    if record is not None and all(Path(p).exists() for p in outputs):
        log.info("== %s: done in an earlier run (%.0f s), skipped", title, record["seconds"])
        times[title] = {"seconds": round(record["seconds"], 1), "skipped": True}
        return record["result"]
    log.info("== %s", title)
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    progress.finish(step, seconds, result)
    log.info("== %s: %.0f s", title, seconds)
    times[title] = {"seconds": round(seconds, 1), "skipped": False}
    return result


# --------------------------------------------------------------------------- the steps


def _synth(cfg: ReproduceConfig) -> dict:
    from wsss.data.synth import generate

    n_train, n_val, n_test = cfg.synth_counts
    summary = generate(Path(cfg.data), n_train=n_train, n_val=n_val, n_test=n_test, workers=max(1, os.cpu_count() or 1))
    write_json(Path(cfg.data) / SYNTH_MARKER, summary)
    return {"train": n_train, "val": n_val, "test": n_test}


def stage1_config(cfg: ReproduceConfig, out: Path, **overrides) -> Stage1Config:
    return cfglib.resolve(Stage1Config, STAGE1_PRESETS, cfg.preset, dataset=cfg.dataset, data=Path(cfg.data),
                          out=out, init_weights=cfg.stage1_init, device=cfg.device, workers=cfg.workers,
                          **overrides)


def stage2_config(cfg: ReproduceConfig, out: Path, report: Path, stage1: Path, pm_dir: Path,
                  **overrides) -> Stage2Config:
    return cfglib.resolve(Stage2Config, STAGE2_PRESETS, cfg.preset, dataset=cfg.dataset, data=Path(cfg.data),
                          out=out, report=report, stage1_checkpoint=stage1, pm_dir=pm_dir, gate=True,
                          init_weights=cfg.stage2_init, device=cfg.device, workers=cfg.workers, **overrides)


def _stage1(s1: Stage1Config, force: bool) -> dict:
    from wsss.stages.stage1 import train

    summary = train(s1, resume=not force, force=force)
    return {"cam": summary.get("cam_metrics"), "checkpoint": summary["checkpoint"]}


def _pseudo_masks(spec: DatasetSpec, cfg: ReproduceConfig, checkpoint: Path, pm_dir: Path) -> dict:
    from wsss.stages.pseudo_masks import PseudoMaskConfig, format_summary, generate

    pm = PseudoMaskConfig(dataset=spec.name, data=Path(cfg.data), checkpoint=checkpoint, layers=PM_LAYERS,
                          out=pm_dir, device=cfg.device, workers=_pm_workers(cfg),
                          force=cfg.force)
    summary = generate(pm)
    log.info(format_summary(summary))
    return {"patches": summary["patches"], "computed": summary["computed"], "out": str(pm_dir)}


def _pm_workers(cfg: ReproduceConfig) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 0 if cfg.preset == "cpu" else 2  # on 2 CPU cores, loader processes only compete with the model


def _eval_pm(spec: DatasetSpec, cfg: ReproduceConfig, pm_dir: Path) -> dict:
    from wsss.stages.pseudo_masks import evaluate, format_evaluation

    results = evaluate(Path(cfg.data), spec, pm_dir)
    log.info(format_evaluation(results))
    return results


def _stage2(s2: Stage2Config, force: bool) -> dict:
    from wsss.stages.stage2 import train

    summary = train(s2, resume=not force, force=force)
    return summary["metrics"]


def _figures(spec: DatasetSpec, cfg: ReproduceConfig, stage1: Path, report: Path) -> dict:
    from wsss.figures import cam_figure, examples_figure

    pred_dirs = {"stage 2": report / "pred", "stage 2 + gate": report / "pred_gate"}
    examples = examples_figure(spec, Path(cfg.data), stage1, pred_dirs, report / "examples.png",
                               layers=PM_LAYERS, device=cfg.device)
    cams = cam_figure(spec, Path(cfg.data), stage1, report / "cams.png", device=cfg.device)
    return {"examples": str(examples), "cams": str(cams)}


# --------------------------------------------------------------------------- the pipeline


def run(cfg: ReproduceConfig) -> dict:
    """Run (or continue) the pipeline; returns the report (also written as JSON and Markdown)."""
    spec = get_spec(cfg.dataset)
    data, out, report = Path(cfg.data), cfg.out_dir, cfg.report_dir
    started = time.perf_counter()
    if cfg.synth and not (data / SYNTH_MARKER).is_file():
        if data.is_dir() and any(data.iterdir()) and not (data / "train").is_dir():
            raise WsssError(f"{data} holds something other than a synthetic dataset; choose another DATA")
        log.info("== synthetic dataset → %s", data)
        t = time.perf_counter()
        _synth(cfg)
        synth_seconds = time.perf_counter() - t
    else:
        synth_seconds = None
    if not data.is_dir():
        raise WsssError(f"dataset folder {data} not found (see README: where to put the datasets)")
    report.mkdir(parents=True, exist_ok=True)
    progress = Progress.open(report / "progress.json", cfg.signature(), cfg.force)
    times: dict[str, dict] = {}
    if synth_seconds is not None:
        times["synthetic data"] = {"seconds": round(synth_seconds, 1), "skipped": False}

    def step(key: str, title: str, fn, outputs=()):
        return _run_step(progress, times, key, title, fn, outputs)

    s1 = stage1_config(cfg, out)
    s1_ckpt = out / f"stage1_checkpoint_trained_on_{spec.name}.pth"
    stage1 = step("stage1", "stage 1: train-stage1 + eval-cam", lambda: _stage1(s1, cfg.force), (s1_ckpt,))
    pm_dir = default_pm_dir(data)
    step("pseudo_masks", "pseudo-masks: generate-pm", lambda: _pseudo_masks(spec, cfg, s1_ckpt, pm_dir),
         tuple(pm_dir / f"PM_{layer}" for layer in PM_LAYERS))
    pm_eval = None
    if train_gt_dir(data).is_dir():
        pm_eval = step("pm_eval", "pseudo-masks: eval-pm", lambda: _eval_pm(spec, cfg, pm_dir))
    s2 = stage2_config(cfg, out, report, s1_ckpt, pm_dir)
    stage2 = step("stage2", "stage 2: train-stage2 --gate", lambda: _stage2(s2, cfg.force),
                  (out / f"stage2_checkpoint_trained_on_{spec.name}.pth", report / "metrics.json"))
    if cfg.figures:
        step("figures", "figures", lambda: _figures(spec, cfg, s1_ckpt, report),
             (report / "examples.png", report / "cams.png"))
    ablations = run_ablations(cfg, spec, progress, times, stage1, stage2, s1_ckpt) if cfg.ablations else {}
    result = {
        "dataset": spec.name,
        "run": cfg.run,
        "data": str(data),
        "preset": cfg.preset,
        "classes": list(spec.classes),
        "stage1_cam": stage1["cam"],
        "pseudo_masks": pm_eval,
        "stage2": {"test": stage2["test"], "test_gate": stage2["test_gate"]},
        "stage2_val_best": stage2.get("val_best"),
        "ablations": ablations,
        "times": times,
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    write_json(report / "report.json", result)
    text = format_report(result)
    with atomic_path(report / "report.md") as tmp:
        tmp.write_text(text)
    return result


def run_ablations(cfg: ReproduceConfig, spec: DatasetSpec, progress: Progress, times: dict, stage1: dict,
                  stage2: dict, s1_ckpt: Path) -> dict:
    """The README's ablations, each a plain option of the commands, in their own folders."""
    out, report, data = cfg.out_dir / "ablation", cfg.report_dir / "ablation", Path(cfg.data)
    pm_dir = default_pm_dir(data)
    rows = {"full method": _row(stage1["cam"], stage2)}

    def step(key, title, fn, outputs=()):
        return _run_step(progress, times, key, title, fn, outputs)

    # Single-layer supervision: bn7 pseudo-masks only (the stage-1 model and PMs are shared).
    single = step("ablation_bn7", "ablation: --pm-layers bn7 --pm-weights 1", lambda: _stage2(stage2_config(
        cfg, out / "bn7_only", report / "bn7_only", s1_ckpt, pm_dir, pm_layers=("bn7",), pm_weights=(1.0,)),
        cfg.force), (report / "bn7_only" / "metrics.json",))
    rows["single-layer PM (bn7)"] = _row(stage1["cam"], single)

    # No PDA: another stage-1 model, its own pseudo-masks, its own stage 2.
    no_pda_out = out / "no_pda"
    no_pda_s1 = stage1_config(cfg, no_pda_out, pda=False)
    no_pda_ckpt = no_pda_out / f"stage1_checkpoint_trained_on_{spec.name}.pth"
    no_pda_pm = no_pda_out / "train_PM"
    s1 = step("ablation_no_pda_s1", "ablation: stage 1 --no-pda", lambda: _stage1(no_pda_s1, cfg.force),
              (no_pda_ckpt,))
    step("ablation_no_pda_pm", "ablation: no-PDA pseudo-masks", lambda: _pseudo_masks(spec, cfg, no_pda_ckpt, no_pda_pm),
         tuple(no_pda_pm / f"PM_{layer}" for layer in PM_LAYERS))
    s2 = step("ablation_no_pda_s2", "ablation: no-PDA stage 2", lambda: _stage2(stage2_config(
        cfg, no_pda_out, report / "no_pda", no_pda_ckpt, no_pda_pm), cfg.force), (report / "no_pda" / "metrics.json",))
    rows["no PDA"] = _row(s1["cam"], s2)

    # Upper bound: the same stage 2 trained on the true masks (synthetic data only).
    gt = train_gt_dir(data)
    if gt.is_dir():
        gt_pm = report / "gt_pm"
        link = gt_pm / "PM_gt"
        if not link.exists():
            gt_pm.mkdir(parents=True, exist_ok=True)
            link.symlink_to(gt.resolve(), target_is_directory=True)
        full = step("ablation_gt", "ablation: fully supervised (--pm-layers gt)", lambda: _stage2(stage2_config(
            cfg, out / "gt", report / "gt", s1_ckpt, gt_pm, pm_layers=("gt",), pm_weights=(1.0,)), cfg.force),
            (report / "gt" / "metrics.json",))
        rows["fully supervised (true masks)"] = _row(None, full)
    return rows


def _row(cam: dict | None, stage2: dict) -> dict:
    def miou(m):
        return None if m is None else m["mIoU"]

    return {"stage1_cam_test": miou((cam or {}).get("test")), "stage2_test": miou(stage2["test"]),
            "stage2_test_gate": miou(stage2.get("test_gate"))}


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- the table


def _f(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_report(r: dict) -> str:
    """The results as Markdown (also readable as plain text in a terminal)."""
    classes = r["classes"]
    rows: list[tuple[str, dict | None]] = []
    cam = r.get("stage1_cam") or {}
    rows.append(("stage-1 CAM (test)", cam.get("test")))
    for layer, metrics in (r.get("pseudo_masks") or {}).items():
        rows.append((f"pseudo-mask {layer} (train vs train_gt)", metrics))
    rows.append(("stage 2 (test)", r["stage2"]["test"]))
    rows.append(("stage 2 + gate (test)", r["stage2"]["test_gate"]))
    lines = [f"# Results: {r['run']} ({r['dataset']} classes, preset {r['preset'] or 'paper'})", ""]
    lines.append("| result | mIoU | fwIoU | pixel acc | " + " | ".join(f"IoU {c}" for c in classes) + " |")
    lines.append("|---|---:|---:|---:|" + "---:|" * len(classes))
    for name, m in rows:
        if m is None:
            continue
        per = [m["per_class"].get(c, {}).get("iou") for c in classes]
        lines.append(f"| {name} | {_f(m['mIoU'])} | {_f(m['fwIoU'])} | {_f(m['pixel_acc'])} | "
                     + " | ".join(_f(v) for v in per) + " |")
    if r.get("pseudo_masks"):
        lines += ["", "Pseudo-mask rows: tissue pixels the mask labels background (ignored by stage 2) are "
                  "left out of the IoU; their share is `background_on_tissue` in report.json."]
    if r.get("ablations"):
        lines += ["", "## Ablations", "", "| variant | stage-1 CAM mIoU | stage 2 mIoU | stage 2 + gate mIoU |",
                  "|---|---:|---:|---:|"]
        for name, row in r["ablations"].items():
            lines.append(f"| {name} | {_f(row['stage1_cam_test'])} | {_f(row['stage2_test'])} | "
                         f"{_f(row['stage2_test_gate'])} |")
    lines += ["", "## Wall time", "", "| step | seconds | |", "|---|---:|---|"]
    total = 0.0
    for title, t in r["times"].items():
        total += t["seconds"]
        lines.append(f"| {title} | {t['seconds']:.0f} | {'from an earlier run' if t['skipped'] else ''} |")
    lines.append(f"| **total** | **{total:.0f}** | |")
    m = r["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
              + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + "."]
    return "\n".join(lines) + "\n"
