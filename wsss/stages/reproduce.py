"""The whole pipeline in one call (``wsss reproduce``, behind ``make reproduce``, ``make ablation``
and ``make quality``).

synthetic data (when asked) → for each training seed: train-stage1 + CAM evaluation → generate-pm →
eval-pm (when ``DATA/train_gt`` exists) → train-stage2 with the gate → the upper bound (stage 2 on
the true masks, when asked) → the ablation variants (when asked) → figures (first seed) → one
results table, written to ``REPORT/report.md`` and ``REPORT/report.json``.

Seed 0 writes to ``OUT``, ``REPORT`` and ``OUT/train_PM`` (as a single ``make reproduce``); seed
``N > 0`` to ``OUT/seedN``, ``REPORT/seedN`` and ``OUT/seedN/train_PM``. Each seed's results go to
``seed_result.json`` in its report folder, and the mean/min/max rows of a seed sweep are computed
from those files (:func:`aggregate_files`).

Re-running continues where a previous run stopped: finished steps are recorded in
``REPORT/progress.json`` and skipped (their results and wall times are read back), an interrupted
training resumes from its last finished epoch, and pseudo-mask generation skips the masks already
written. The progress file also records the settings; a re-run with other settings stops with a
clear message instead of mixing results (``--force`` starts over).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsss import config as cfglib
from wsss.config import IMPROVEMENTS, PM_PRESETS, STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config
from wsss.data.layout import train_gt_dir
from wsss.data.specs import SPECS, DatasetSpec, get_spec
from wsss.data.synth import resolve_look
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_options
from wsss.metrics import write_json
from wsss.data.validate import input_folders
from wsss.runs.journal import Journal
from wsss.runs.owner import owned_folder
from wsss.runtime import atomic_path, check_precision, continue_with_same_command, note_saved, usable_cpus
from wsss.stages.stage1 import FIT_LABEL_ACC

log = logging.getLogger(__name__)

PM_LAYERS = ("b4_5", "b5_2", "bn7")
SYNTH_MARKER = "synth.json"  # wsss.data.synth.SUMMARY_NAME: written once the synthetic data is complete
SEED_RESULT = "seed_result.json"


def default_run(dataset: str, synth: bool) -> str:
    """The run name when ``--run`` is not given: the spec's name, ``synthetic`` for synthetic luad
    data (``make reproduce``) and ``synthetic-<name>`` for synthetic data of another spec."""
    name = get_spec(dataset).name
    if not synth:
        return name
    return "synthetic" if name == "luad" else f"synthetic-{name}"


@dataclass(frozen=True)
class ReproduceConfig:
    dataset: str  # luad, bcss or the path of a TOML spec file
    data: Path
    run: str  # names the checkpoint and report folders (e.g. "synthetic", "luad")
    labels_csv: Path | None = None  # None: the spec's label source
    preset: str | None = None  # "cpu", "best" or None (the paper's settings)
    config_file: Path | None = None  # a --config file: its [stage1] [pseudo_masks] [stage2] over the preset
    out: Path | None = None  # None: checkpoints/<run>
    report: Path | None = None  # None: results/<run>
    synth: bool = False  # generate the synthetic dataset into DATA first (skipped when it is there)
    synth_counts: tuple[int, int, int] = (1000, 100, 100)
    synth_look: str = "default"  # the look of the synthetic data (wsss.data.synth.LOOKS)
    synth_task: int | None = None  # a random synthetic task (wsss.data.tasks) instead of the fixed textures
    synth_tasks: tuple[int, ...] = ()  # several: one run per task in DATA/task<K>, results over all of them
    synth_difficulty: float = 0.5
    synth_size: int = 224  # patch side of the synthetic data
    synth_mpp: float | None = None  # its µm/px (None: the 224-px field at any size)
    transfer: Path | None = None  # also test each seed's stage 2 on this dataset's test split
    stage1_init: Path | None = None
    stage2_init: Path | None = None
    seeds: tuple[int, ...] = (0,)  # training seeds; several make a seed sweep (mean, min, max)
    gate_mode: str | None = None  # None: the preset's (paper, cpu-paper: reference; cpu, best: mask)
    upper_bound: bool = False  # also train stage 2 on the true masks (DATA/train_gt) for every seed
    device: str = "auto"
    precision: str | None = None  # of every step (None: each step's preset or --config value); not in the signature
    workers: int | None = None
    ablations: bool = False
    figures: bool = True
    force: bool = False
    # the --config file's tables, read once (table name -> values)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in STAGE2_PRESETS:
            raise WsssError(f"unknown preset {self.preset!r}; choose one of {', '.join(STAGE2_PRESETS)}")
        if self.config_file is not None:
            from wsss.config import PseudoMaskConfig

            object.__setattr__(self, "_tables", {
                table: cfglib.read_config_table(Path(self.config_file), table, cls)
                for table, cls in (("stage1", Stage1Config), ("pseudo_masks", PseudoMaskConfig),
                                   ("stage2", Stage2Config))})
        if self.gate_mode is None:
            object.__setattr__(self, "gate_mode", self.stage2_setting("gate_mode"))
        check_gate_options(self.gate_mode, DEFAULT_GATE_THRESHOLD)
        if self.precision is not None:
            check_precision(self.precision)
        resolve_look(self.synth_look)
        from wsss.data.tasks import check_difficulty

        check_difficulty(self.synth_difficulty)
        tasks = tuple(int(t) for t in self.synth_tasks)
        if len(set(tasks)) != len(tasks) or any(t < 0 for t in tasks):
            raise WsssError(f"--synth-tasks needs distinct non-negative task seeds, not {','.join(map(str, tasks))}")
        if tasks and not self.synth:
            raise WsssError("--synth-tasks generates the tasks' data: it needs --synth")
        object.__setattr__(self, "synth_tasks", tasks)
        seeds = tuple(int(s) for s in self.seeds)
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise WsssError(f"--seeds needs distinct non-negative seeds, not {','.join(map(str, self.seeds)) or 'none'}")
        object.__setattr__(self, "seeds", seeds)

    def file_table(self, table: str) -> dict[str, Any]:
        """A copy of the ``[table]`` of the ``--config`` file (nothing without one)."""
        return dict(self._tables.get(table, {}))

    def stage2_setting(self, key: str) -> Any:
        """Stage 2's ``key`` before this call's options: the ``--config`` file's, else the preset's
        (``--preset``, else the file's ``preset``), else the default."""
        from_file = self.file_table("stage2")
        preset = STAGE2_PRESETS.get(self.preset or from_file.get("preset") or "paper", {})
        return from_file.get(key, preset.get(key, _default(Stage2Config, key)))

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("checkpoints") / self.run

    @property
    def report_dir(self) -> Path:
        return Path(self.report) if self.report is not None else Path("results") / self.run

    def seed_dirs(self, seed: int) -> tuple[Path, Path]:
        """Checkpoint and report folders of one training seed."""
        if seed == 0:
            return self.out_dir, self.report_dir
        return self.out_dir / f"seed{seed}", self.report_dir / f"seed{seed}"

    def signature(self) -> dict:
        """What the results depend on (not how or where they are computed)."""
        spec = get_spec(self.dataset)
        return {"dataset": spec.name, "classes": list(spec.classes), "data": str(self.data), "preset": self.preset,
                "stage1_init": _str(self.stage1_init), "stage2_init": _str(self.stage2_init),
                "gate_mode": self.gate_mode, "config": self._config_signature(),
                "synth_look": self.synth_look if self.synth and self.synth_look != "default" else None,
                "synth_data": self._synth_signature()}

    def _config_signature(self) -> dict | None:
        """The ``--config`` file's tables as read (what they set, not where the file is)."""
        if self.config_file is None:
            return None
        return json.loads(json.dumps(self._tables, default=str))

    def _synth_signature(self) -> dict | None:
        """What the generated data depends on beyond its look (None: the default synthetic data)."""
        if not self.synth:
            return None
        sig = {"task": self.synth_task, "difficulty": self.synth_difficulty if self.synth_task is not None else None,
               "size": self.synth_size, "mpp": self.synth_mpp, "tasks": list(self.synth_tasks) or None}
        return None if sig == {"task": None, "difficulty": None, "size": 224, "mpp": None, "tasks": None} else sig

    def task_config(self, task: int) -> "ReproduceConfig":
        """The run of one task of ``synth_tasks``: its data, checkpoints and report in ``task<K>`` folders."""
        name = f"task{task}"
        return dataclasses.replace(self, synth_tasks=(), synth_task=task, data=Path(self.data) / name,
                                   out=self.out_dir / name, report=self.report_dir / name, run=f"{self.run}-{name}",
                                   figures=False)


# Keys added to the signature after the first release, with the value older progress files meant.
_SIGNATURE_DEFAULTS = {"gate_mode": "mask", "synth_look": None, "synth_data": None, "config": None}


def _with_defaults(saved: dict) -> dict:
    """A saved signature completed with what older progress files meant (their dataset was luad or bcss)."""
    old = {**_SIGNATURE_DEFAULTS, **saved}
    if "classes" not in old and str(old.get("dataset")) in SPECS:
        old["classes"] = list(SPECS[old["dataset"]].classes)
    return old


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _run_step(progress: Journal, times: dict[str, dict], step: str, title: str, fn: Callable[[], dict | None],
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


# --------------------------------------------------------------------------- ablation variants


@dataclass(frozen=True)
class Variant:
    """One ablation row: the preset's pipeline with some settings changed.

    A variant with ``stage1`` overrides trains its own classifier; with ``stage1`` or ``pm``
    overrides it makes its own pseudo-masks; otherwise it reuses those of the main run.
    ``true_masks`` trains stage 2 on ``DATA/train_gt`` (the fully supervised upper bound).
    """

    key: str  # its folder under ablation/
    title: str  # its row in the report
    stage1: Mapping[str, Any] = field(default_factory=dict)
    pm: Mapping[str, Any] = field(default_factory=dict)
    stage2: Mapping[str, Any] = field(default_factory=dict)
    true_masks: bool = False


UPPER_BOUND = Variant("gt", "fully supervised (true masks)", true_masks=True,
                      stage2={"pm_layers": ("gt",), "pm_weights": (1.0,)})


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def improvement_variants(preset: str | None) -> list[Variant]:
    """One row per setting in which our presets differ from the reference (``config.IMPROVEMENTS``):
    for a preset that has it, the row goes back to the paper's value; for one that does not, the row
    turns it on. So every improvement, and every recipe correction, shows what it does."""
    from wsss.stages.pseudo_masks import PseudoMaskConfig

    steps = {"stage1": ("stage 1", STAGE1_PRESETS, Stage1Config), "pm": ("pseudo-masks", PM_PRESETS, PseudoMaskConfig),
             "stage2": ("stage 2", STAGE2_PRESETS, Stage2Config)}
    variants = []
    for step, ours in IMPROVEMENTS.items():
        title, presets, cls = steps[step]
        values = presets.get(preset or "paper", {})
        for key, improved in ours.items():
            paper = _default(cls, key)
            other = paper if values.get(key, paper) != paper else improved
            label = "paper" if other == paper else "ours"
            option = key.replace("_", "-")
            text = (f"--{option}" if other else f"--no-{option}") if isinstance(other, bool) else f"--{option} {_fmt(other)}"
            variants.append(Variant(f"{step}_{key}_{_fmt(other)}", f"{title} {text} ({label})", **{step: {key: other}}))
    return variants


def ablation_variants(preset: str | None) -> list[Variant]:
    """The README's ablations for ``preset``: each changes one thing of the full method."""
    return [
        Variant("bn7_only", "single-layer PM (bn7)", stage2={"pm_layers": ("bn7",), "pm_weights": (1.0,)}),
        *improvement_variants(preset),  # PDA among them
        # options measured for the presets and left out of them (docs/results.md): what they do here
        Variant("stage2_ema_0.99", "stage 2 --ema 0.99 (in no preset)", stage2={"ema": 0.99}),
    ]


# --------------------------------------------------------------------------- the steps


def _synth(cfg: ReproduceConfig) -> dict:
    from wsss.data.synth import generate

    from wsss.data.tasks import sample_task

    n_train, n_val, n_test = cfg.synth_counts
    spec = get_spec(cfg.dataset)
    task = None if cfg.synth_task is None else sample_task(cfg.synth_task, spec.num_classes, cfg.synth_difficulty)
    generate(Path(cfg.data), n_train=n_train, n_val=n_val, n_test=n_test, size=cfg.synth_size,
             workers=usable_cpus(), look=resolve_look(cfg.synth_look), spec=spec, task=task,
             mpp=cfg.synth_mpp)
    return {"train": n_train, "val": n_val, "test": n_test}


def check_synth_data(cfg: ReproduceConfig, marker: Path) -> None:
    """Synthetic data already in DATA is used only when it is what ``--synth`` would write now (its
    size, look, task and µm/px): otherwise a run would silently train on other data."""
    from wsss.data.tasks import sample_task

    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        raise WsssError(f"{marker} is unreadable: delete {marker.parent} to generate the synthetic data again") from None
    spec = get_spec(cfg.dataset)
    task = None if cfg.synth_task is None else sample_task(cfg.synth_task, spec.num_classes, cfg.synth_difficulty)
    look = resolve_look(cfg.synth_look).to_dict()
    recorded_look = {**look, **{k: v for k, v in (recorded.get("look") or {}).items() if k in look}}
    recorded = {**recorded, "look": recorded_look}  # looks recorded before a field existed had its default
    wanted = {"size": cfg.synth_size, "look": look, "task": None if task is None else task.to_dict()}
    if cfg.synth_mpp is not None:
        wanted["mpp"] = cfg.synth_mpp
    differ = [f"{k} {_short(recorded.get(k, 224 if k == 'size' else None))} (asked {_short(v)})"
              for k, v in wanted.items() if _norm_json(recorded.get(k, 224 if k == "size" else None)) != _norm_json(v)]
    if differ:
        raise WsssError(f"{marker.parent} holds synthetic data of other settings ({'; '.join(differ)}); choose another "
                        f"--data, or delete that folder to generate it again")


def _norm_json(value):
    return json.loads(json.dumps(value))


def _short(value) -> str:
    if isinstance(value, dict):
        return "task " + str(value["seed"]) if "seed" in value else "look " + ",".join(f"{k}={v:g}" for k, v in value.items())
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _resolve(cfg: ReproduceConfig, cls: type, presets: dict, table: str, run: dict[str, Any],
             overrides: Mapping[str, Any]):
    """One step's configuration: its defaults, the preset (``--preset``, else the ``--config`` table's
    ``preset``), the ``--config`` file's table, then what the chain sets for this run (``run``: data,
    folders, device, precision, seed; None leaves the earlier value), then an ablation's ``overrides``."""
    from_file = cfg.file_table(table)
    preset = cfg.preset if cfg.preset is not None else from_file.get("preset")
    from_file.pop("preset", None)
    return cfglib.resolve(cls, presets, preset, **{**from_file, **{k: v for k, v in run.items() if v is not None},
                                                   **overrides})


def stage1_config(cfg: ReproduceConfig, out: Path, seed: int = 0, **overrides) -> Stage1Config:
    return _resolve(cfg, Stage1Config, STAGE1_PRESETS, "stage1", dict(
        dataset=cfg.dataset, data=Path(cfg.data), out=out, labels_csv=cfg.labels_csv, init_weights=cfg.stage1_init,
        device=cfg.device, precision=cfg.precision, workers=cfg.workers, seed=seed), overrides)


def stage2_config(cfg: ReproduceConfig, out: Path, report: Path, stage1: Path, pm_dir: Path, seed: int = 0,
                  **overrides) -> Stage2Config:
    return _resolve(cfg, Stage2Config, STAGE2_PRESETS, "stage2", dict(
        dataset=cfg.dataset, data=Path(cfg.data), out=out, report=report, labels_csv=cfg.labels_csv,
        stage1_checkpoint=stage1, pm_dir=pm_dir, gate=True, gate_mode=cfg.gate_mode, init_weights=cfg.stage2_init,
        device=cfg.device, precision=cfg.precision, workers=cfg.workers, seed=seed), overrides)


def pm_config(cfg: ReproduceConfig, checkpoint: Path, pm_dir: Path, **overrides):
    from wsss.config import PseudoMaskConfig

    return _resolve(cfg, PseudoMaskConfig, PM_PRESETS, "pseudo_masks", dict(
        dataset=cfg.dataset, data=Path(cfg.data), checkpoint=checkpoint, layers=PM_LAYERS, out=pm_dir,
        device=cfg.device, precision=cfg.precision, workers=cfg.workers, force=cfg.force,
        labels_csv=cfg.labels_csv), overrides)


def classifier_path(out: Path, spec: DatasetSpec) -> Path:
    """Where a chain's stage 1 keeps its classifier (train-stage1's default name)."""
    return out / f"stage1_checkpoint_trained_on_{spec.name}.pth"


def print_config(cfg: ReproduceConfig) -> str:
    """The three steps' configurations of the first seed's chain, fully resolved, as one ``--config`` file."""
    seed = cfg.seeds[0]
    out, report = cfg.seed_dirs(seed)
    s1_ckpt = classifier_path(out, get_spec(cfg.dataset))
    pm_dir = out / "train_PM"
    return "\n".join([cfglib.config_toml(stage1_config(cfg, out, seed), "stage1"),
                      cfglib.config_toml(pm_config(cfg, s1_ckpt, pm_dir), "pseudo_masks"),
                      cfglib.config_toml(stage2_config(cfg, out, report, s1_ckpt, pm_dir, seed), "stage2")])


def _stage1(s1: Stage1Config, force: bool) -> dict:
    from wsss.stages.stage1 import train

    summary = train(s1, resume=not force, force=force)
    return {"cam": summary.get("cam_metrics"), "checkpoint": summary["checkpoint"], "fit": summary.get("fit")}


def _pseudo_masks(pm) -> dict:
    from wsss.stages.pseudo_masks import format_summary, generate

    summary = generate(pm)
    log.info(format_summary(summary))
    return {"patches": summary["patches"], "computed": summary["computed"], "out": str(pm.out)}


def _eval_pm(spec: DatasetSpec, cfg: ReproduceConfig, pm_dir: Path) -> dict:
    from wsss.stages.pseudo_masks import evaluate, format_evaluation

    results = evaluate(Path(cfg.data), spec, pm_dir)
    log.info(format_evaluation(results))
    return results


def _stage2(s2: Stage2Config, force: bool) -> dict:
    from wsss.stages.stage2 import train

    summary = train(s2, resume=not force, force=force)
    return summary["metrics"]


def _transfer(cfg: ReproduceConfig, spec: DatasetSpec, checkpoint: Path, stage1: Path) -> dict:
    """The seed's stage 2 (and gate) tested on another dataset's test split: data it never saw."""
    from wsss.runtime import resolve_device
    from wsss.stages.stage2 import evaluate_checkpoint

    if not Path(cfg.transfer).is_dir():
        raise WsssError(f"--transfer: dataset folder {cfg.transfer} not found")
    metrics = evaluate_checkpoint(spec, Path(cfg.transfer), checkpoint, "test", resolve_device(cfg.device),
                                  stage1_checkpoint=stage1, precision=step_precision(cfg), gate_mode=cfg.gate_mode)
    return {"data": str(cfg.transfer), "test": metrics["test"], "test_gate": metrics["test_gate"]}


def _figures(spec: DatasetSpec, cfg: ReproduceConfig, stage1: Path, report: Path, pm) -> dict:
    """examples.png and cams.png of one seed (``spec`` carries the label source)."""
    from wsss.figures import cam_figure, examples_figure

    pred_dirs = {"stage 2": report / "pred", "stage 2 + gate": report / "pred_gate"}
    examples = examples_figure(spec, Path(cfg.data), stage1, pred_dirs, report / "examples.png",
                               layers=PM_LAYERS, device=cfg.device, method=pm.method)
    cams = cam_figure(spec, Path(cfg.data), stage1, report / "cams.png", device=cfg.device)
    return {"examples": str(examples), "cams": str(cams)}


# --------------------------------------------------------------------------- one seed


@dataclass
class _Context:
    cfg: ReproduceConfig
    spec: DatasetSpec
    progress: Journal
    times: dict[str, dict]

    def step(self, key: str, title: str, fn, outputs=()):
        return _run_step(self.progress, self.times, key, title, fn, outputs)


@dataclass
class _Main:
    """The main pipeline of one seed, which the variants build on."""

    seed: int
    out: Path
    report: Path
    s1_ckpt: Path
    pm_dir: Path
    cam: dict | None
    pm_eval: dict | None


def _labels(seed: int) -> tuple[str, str]:
    """Progress-key prefix and title prefix of a seed (seed 0 keeps the single-run names)."""
    return ("", "") if seed == 0 else (f"seed{seed}/", f"seed {seed}: ")


def _run_seed(ctx: _Context, seed: int, figures: bool) -> dict:
    cfg, spec, data = ctx.cfg, ctx.spec, Path(ctx.cfg.data)
    key, title = _labels(seed)
    out, report = cfg.seed_dirs(seed)
    s1 = stage1_config(cfg, out, seed)
    s1_ckpt = classifier_path(out, spec)
    stage1 = ctx.step(f"{key}stage1", f"{title}stage 1: train-stage1 + eval-cam", lambda: _stage1(s1, cfg.force),
                      (s1_ckpt,))
    pm_dir = out / "train_PM"  # the run's own pseudo-masks (DATA/train_PM may hold someone else's)
    pm = pm_config(cfg, s1_ckpt, pm_dir)
    ctx.step(f"{key}pseudo_masks", f"{title}pseudo-masks: generate-pm", lambda: _pseudo_masks(pm),
             tuple(pm_dir / f"PM_{layer}" for layer in PM_LAYERS))
    pm_eval = None
    if train_gt_dir(data).is_dir():
        pm_eval = ctx.step(f"{key}pm_eval", f"{title}pseudo-masks: eval-pm", lambda: _eval_pm(spec, cfg, pm_dir))
    s2 = stage2_config(cfg, out, report, s1_ckpt, pm_dir, seed)
    stage2 = ctx.step(f"{key}stage2", f"{title}stage 2: train-stage2 --gate", lambda: _stage2(s2, cfg.force),
                      (out / f"stage2_checkpoint_trained_on_{spec.name}.pth", report / "metrics.json"))
    main = _Main(seed, out, report, s1_ckpt, pm_dir, stage1["cam"], pm_eval)
    result = {
        "seed": seed,
        "stage1_cam": stage1["cam"],
        "stage1_fit": stage1.get("fit"),
        "pseudo_masks": pm_eval,
        "stage2": {"test": stage2["test"], "test_gate": stage2["test_gate"],
                   # the last epoch's model instead of the best on val (the same model when the best is the last)
                   "test_last_epoch": stage2.get("test_last_epoch") or stage2["test_gate"] or stage2["test"],
                   "best_epoch": stage2.get("best_epoch")},
        "stage2_val_best": stage2.get("val_best"),
        "upper_bound": None,
        "ablations": {},
    }
    has_gt = train_gt_dir(data).is_dir()
    if cfg.upper_bound or cfg.ablations:
        if has_gt:
            full = _run_variant(ctx, main, UPPER_BOUND)
            result["upper_bound"] = full["stage2"]
        else:
            log.info("no %s: the fully supervised upper bound needs the true masks", train_gt_dir(data))
    if cfg.ablations:
        rows = {"full method": _row(result)}
        for variant in ablation_variants(cfg.preset):
            rows[variant.title] = _row(_run_variant(ctx, main, variant))
        if result["upper_bound"] is not None:
            rows[UPPER_BOUND.title] = _row({"stage1_cam": None, "stage2": result["upper_bound"]})
        result["ablations"] = rows
    if cfg.transfer is not None:
        result["transfer"] = ctx.step(
            f"{key}transfer", f"{title}transfer: evaluate on {cfg.transfer}",
            lambda: _transfer(cfg, spec, out / f"stage2_checkpoint_trained_on_{spec.name}.pth", s1_ckpt))
    if figures:
        ctx.step(f"{key}figures", f"{title}figures", lambda: _figures(spec, cfg, s1_ckpt, report, pm),
                 (report / "examples.png", report / "cams.png"))
    write_json(report / SEED_RESULT, result)
    return result


def _run_variant(ctx: _Context, main: _Main, v: Variant) -> dict:
    """Run (or read back) one variant of ``main``'s seed; returns its seed-result-like dict."""
    cfg, spec, data = ctx.cfg, ctx.spec, Path(ctx.cfg.data)
    key, title = _labels(main.seed)
    key, title = f"{key}ablation/{v.key}/", f"{title}ablation {v.title}: "
    out, report = main.out / "ablation" / v.key, main.report / "ablation" / v.key
    s1_ckpt, cam, pm_dir, pm_eval = main.s1_ckpt, main.cam, main.pm_dir, main.pm_eval
    if v.stage1:
        s1 = stage1_config(cfg, out, main.seed, **v.stage1)
        s1_ckpt = classifier_path(out, spec)
        cam = ctx.step(f"{key}stage1", f"{title}stage 1", lambda: _stage1(s1, cfg.force), (s1_ckpt,))["cam"]
    if v.stage1 or v.pm:
        pm_dir = out / "train_PM"
        pm = pm_config(cfg, s1_ckpt, pm_dir, **v.pm)
        ctx.step(f"{key}pseudo_masks", f"{title}pseudo-masks", lambda: _pseudo_masks(pm),
                 tuple(pm_dir / f"PM_{layer}" for layer in PM_LAYERS))
        if train_gt_dir(data).is_dir():
            pm_eval = ctx.step(f"{key}pm_eval", f"{title}eval-pm", lambda: _eval_pm(spec, cfg, pm_dir))
    if v.true_masks:
        cam, pm_eval = None, None
        pm_dir = report / "gt_pm"
        link = pm_dir / "PM_gt"
        if not link.exists():
            pm_dir.mkdir(parents=True, exist_ok=True)
            link.symlink_to(train_gt_dir(data).resolve(), target_is_directory=True)
    s2 = stage2_config(cfg, out, report, s1_ckpt, pm_dir, main.seed, **v.stage2)
    stage2 = ctx.step(f"{key}stage2", f"{title}stage 2", lambda: _stage2(s2, cfg.force), (report / "metrics.json",))
    return {"stage1_cam": cam, "pseudo_masks": pm_eval,
            "stage2": {"test": stage2["test"], "test_gate": stage2["test_gate"]}}


def _miou(m: dict | None) -> float | None:
    return None if m is None else m["mIoU"]


def _row(result: dict) -> dict:
    return {"stage1_cam_test": _miou((result.get("stage1_cam") or {}).get("test")),
            "stage2_test": _miou(result["stage2"]["test"]), "stage2_test_gate": _miou(result["stage2"].get("test_gate"))}


# --------------------------------------------------------------------------- the pipeline


def run(cfg: ReproduceConfig) -> dict:
    """Run (or continue) the pipeline for every seed; returns the report (also written as JSON and Markdown)."""
    if cfg.synth_tasks:
        return run_tasks(cfg)
    spec = get_spec(cfg.dataset, cfg.labels_csv)
    data, report = Path(cfg.data), cfg.report_dir
    started = time.perf_counter()
    if cfg.synth and (data / SYNTH_MARKER).is_file():
        check_synth_data(cfg, data / SYNTH_MARKER)
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
        raise WsssError(f"dataset folder {data} not found (docs/datasets.md says where to put them)")
    continue_with_same_command()
    log.info("initial weights: %s", describe_init_weights(init_weights(cfg)))
    folders = input_folders(data)
    with owned_folder(cfg.out_dir, "reproduce", force=cfg.force, read_from=folders, config=cfg.signature()), \
            owned_folder(report, "reproduce", force=cfg.force, option="--report", read_from=folders,
                         config=cfg.signature()) as owner:
        journal = Journal.open(report / "progress.json", cfg.signature(), force=cfg.force, upgrade=_with_defaults,
                               advice="pass --force to start over, or choose another --report / --out")
        ctx = _Context(cfg, spec, journal, {})
        owner.claim([report / "report.json", report / "report.md"])
        note_saved(f"the finished steps are recorded in {ctx.progress.path}")
        if synth_seconds is not None:
            ctx.times["synthetic data"] = {"seconds": round(synth_seconds, 1), "skipped": False}
        for i, seed in enumerate(cfg.seeds):
            _run_seed(ctx, seed, figures=cfg.figures and i == 0)
        return _report(cfg, spec, ctx, started)


def _report(cfg: ReproduceConfig, spec: DatasetSpec, ctx: "_Context", started: float) -> dict:
    """The report of every seed's results: written as JSON and Markdown, and returned."""
    data, report = Path(cfg.data), cfg.report_dir
    per_seed = {seed: json.loads((cfg.seed_dirs(seed)[1] / SEED_RESULT).read_text()) for seed in cfg.seeds}
    first = per_seed[cfg.seeds[0]]
    result = {
        "dataset": spec.name,
        "run": cfg.run,
        "data": str(data),
        "preset": cfg.preset,
        "gate_mode": cfg.gate_mode,
        "init_weights": init_weights(cfg),
        "classes": list(spec.classes),
        "seeds": list(cfg.seeds),
        # The first seed's results, as a single run reports them.
        "stage1_cam": first["stage1_cam"],
        "pseudo_masks": first["pseudo_masks"],
        "stage2": first["stage2"],
        "stage2_val_best": first["stage2_val_best"],
        "upper_bound": first["upper_bound"],
        "transfer": first.get("transfer"),
        "ablations": first["ablations"],
        "summary": aggregate_files([cfg.seed_dirs(seed)[1] / SEED_RESULT for seed in cfg.seeds]),
        "times": ctx.times,
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "precision": _precision(cfg),
    }
    write_json(report / "report.json", result)
    text = format_report(result)
    with atomic_path(report / "report.md") as tmp:
        tmp.write_text(text)
    return result


# --------------------------------------------------------------------------- random tasks


def run_tasks(cfg: ReproduceConfig) -> dict:
    """``--synth-tasks``: the pipeline on every random task (each its own dataset, checkpoints and
    report under ``task<K>``, all seeds), then one table over every task × seed run (mean, worst,
    best of each row, and each task's mean over the seeds) in ``REPORT/report.md`` and ``.json``."""
    started = time.perf_counter()
    spec = get_spec(cfg.dataset, cfg.labels_csv)
    with owned_folder(cfg.report_dir, "reproduce", force=cfg.force, option="--report", config=cfg.signature()) as owner:
        owner.claim([cfg.report_dir / "report.json", cfg.report_dir / "report.md"])
        for task in cfg.synth_tasks:
            log.info("=== task %d", task)
            run(cfg.task_config(task))
        return _task_report(cfg, spec, started)


def _task_report(cfg: ReproduceConfig, spec: DatasetSpec, started: float) -> dict:
    runs = []
    for task in cfg.synth_tasks:
        sub = cfg.task_config(task)
        for seed in cfg.seeds:
            result = json.loads((sub.seed_dirs(seed)[1] / SEED_RESULT).read_text())
            runs.append({**result, "seed": f"{task}/{seed}", "task": task})
    report = cfg.report_dir
    result = {
        "dataset": spec.name, "run": cfg.run, "data": str(cfg.data), "preset": cfg.preset, "gate_mode": cfg.gate_mode,
        "classes": list(spec.classes), "tasks": list(cfg.synth_tasks), "seeds": list(cfg.seeds),
        "difficulty": cfg.synth_difficulty, "size": cfg.synth_size, "mpp": cfg.synth_mpp,
        "summary": aggregate([_with_gap(r) for r in runs]),
        "fits": [{"task": r["task"], "seed": r["seed"], **(r.get("stage1_fit") or {})} for r in runs],
        "wall_seconds_this_call": round(time.perf_counter() - started, 1), "machine": machine(),
        "precision": _precision(cfg),
    }
    write_json(report / "report.json", result)
    with atomic_path(report / "report.md") as tmp:
        tmp.write_text(format_task_report(result))
    return result


def _with_gap(result: dict) -> dict:
    """A seed result with the gap of stage 2 + gate to its upper bound (+ gate) as an extra row."""
    gap = None
    if result.get("upper_bound") and result["stage2"].get("test_gate"):
        upper, ours = _miou(result["upper_bound"].get("test_gate")), _miou(result["stage2"]["test_gate"])
        if upper is not None and ours is not None:
            gap = upper - ours
    return {**result, "gap": gap}


def format_task_report(r: dict) -> str:
    """The table of a ``--synth-tasks`` run: each row's mean, worst and best over every task × seed,
    then each task's mean over the seeds."""
    tasks, seeds = r["tasks"], r["seeds"]
    lines = [f"# Results over random synthetic tasks ({r['dataset']} classes, preset {r['preset'] or 'paper'}, "
             f"gate {r['gate_mode']}, difficulty {r['difficulty']:g}, {r['size']} px"
             + (f" at {r['mpp']:g} µm/px" if r.get("mpp") else "") + ")", "",
             f"Tasks {', '.join(map(str, tasks))} × training seeds {', '.join(map(str, seeds))} "
             f"({len(tasks) * len(seeds)} runs). Worst: the lowest value (for the gap, the largest).", "",
             "| result | mean | worst | best | " + " | ".join(f"task {t}" for t in tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for name, row in r["summary"].items():
        per_task = []
        for t in tasks:
            values = [v for k, v in row["per_seed"].items() if k.split("/")[0] == str(t) and v is not None
                      and math.isfinite(v)]
            per_task.append(sum(values) / len(values) if values else None)
        worst, best = (row["max"], row["min"]) if name == GAP_ROW else (row["min"], row["max"])
        lines.append(f"| {name} | {_f(row['mean'])} | {_f(worst)} | {_f(best)} | "
                     + " | ".join(_f(v) for v in per_task) + " |")
    unfit = [f for f in r["fits"] if f.get("fits") is False]
    refit = [f for f in r["fits"] if f.get("before_refit")]
    lines += ["", f"Stage 1 fits its training labels (label accuracy ≥ {FIT_LABEL_ACC:g}) in "
              f"{len(r['fits']) - len(unfit)} of {len(r['fits'])} runs"
              + ("." if not unfit else ": not in " + ", ".join(f"task/seed {f['seed']} ({f['label_acc']:.3f})"
                                                                for f in unfit) + ".")
              + ("" if not refit else " Refit epochs ran in " + ", ".join(
                  f"task/seed {f['seed']} ({f['before_refit']['label_acc']:.3f} → {f['label_acc']:.3f})"
                  for f in refit) + ".")]
    m = r["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
              + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + f", precision {r.get('precision', 'fp32')}."]
    return "\n".join(lines) + "\n"


def init_weights(cfg: ReproduceConfig) -> dict[str, str | None]:
    """The initial weights each training stage starts from (None: random initialisation)."""
    return {"stage1": _str(cfg.stage1_init), "stage2": _str(cfg.stage2_init)}


def describe_init_weights(weights: dict[str, str | None]) -> str:
    """``stage 1 PATH; stage 2 none (random initialisation)``."""
    return "; ".join(f"stage {n} {weights.get(f'stage{n}') or 'none (random initialisation)'}" for n in (1, 2))


# --------------------------------------------------------------------------- seed sweeps


def result_rows(result: dict) -> dict[str, float | None]:
    """The mIoU rows of one seed's result (``seed_result.json``), in report order."""
    rows: dict[str, float | None] = {}
    if result.get("stage1_fit"):
        rows[FIT_ROW] = result["stage1_fit"]["label_acc"]
    rows["stage-1 CAM (test)"] = _miou((result.get("stage1_cam") or {}).get("test"))
    for layer, metrics in (result.get("pseudo_masks") or {}).items():
        rows[f"pseudo-mask {layer} (train vs train_gt)"] = _miou(metrics)
    rows["stage 2 (test)"] = _miou(result["stage2"]["test"])
    rows["stage 2 + gate (test)"] = _miou(result["stage2"].get("test_gate"))
    if result["stage2"].get("test_last_epoch"):
        rows[LAST_EPOCH_ROW] = _miou(result["stage2"]["test_last_epoch"])
    if result.get("upper_bound"):
        rows["upper bound: stage 2 on true masks (test)"] = _miou(result["upper_bound"]["test"])
        rows["upper bound + gate (test)"] = _miou(result["upper_bound"].get("test_gate"))
    if result.get("transfer"):
        name = Path(result["transfer"]["data"]).name
        rows[f"stage 2 tested on {name}"] = _miou(result["transfer"]["test"])
        rows[f"stage 2 + gate tested on {name}"] = _miou(result["transfer"]["test_gate"])
    if result.get("gap") is not None:
        rows[GAP_ROW] = result["gap"]
    for name, row in (result.get("ablations") or {}).items():
        if name == "full method":
            continue
        for part, value in (("stage-1 CAM", row["stage1_cam_test"]), ("stage 2", row["stage2_test"]),
                            ("stage 2 + gate", row["stage2_test_gate"])):
            if value is not None:
                rows[f"ablation {name}: {part}"] = value
    return rows


FIT_ROW = "stage-1 label accuracy on its training patches (fit)"
LAST_EPOCH_ROW = "stage 2 + gate, last epoch instead of best on val (test)"
GAP_ROW = "gap: upper bound + gate − stage 2 + gate"


def aggregate(results: Sequence[dict]) -> dict[str, dict]:
    """``{row: {"mean", "min", "max", "n", "per_seed": {seed: value}}}`` over seed results.

    Mean, min and max are over the seeds with a finite value in that row.
    """
    table: dict[str, dict] = {}
    for result in results:
        for row, value in result_rows(result).items():
            table.setdefault(row, {"per_seed": {}})["per_seed"][str(result["seed"])] = value
    for row in table.values():
        values = [v for v in row["per_seed"].values() if v is not None and math.isfinite(v)]
        row["n"] = len(values)
        row["mean"] = sum(values) / len(values) if values else None
        row["min"] = min(values) if values else None
        row["max"] = max(values) if values else None
    return table


def aggregate_files(paths: Sequence[Path]) -> dict[str, dict]:
    """:func:`aggregate` of the ``seed_result.json`` files at ``paths``."""
    return aggregate([json.loads(Path(p).read_text()) for p in paths])


def _precision(cfg: ReproduceConfig) -> str:
    """The precision this call's stage 2 computed in (``auto`` resolved; the other steps' alike unless
    a --config file sets them apart)."""
    from wsss.runtime import resolve_device, resolve_precision

    return resolve_precision(step_precision(cfg), resolve_device(cfg.device))


def step_precision(cfg: ReproduceConfig) -> str:
    """``--precision``, else what the ``--config`` file's or the preset's ``[stage2]`` says."""
    return cfg.precision if cfg.precision is not None else cfg.stage2_setting("precision")


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- the table


def _f(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_report(r: dict) -> str:
    """The results as Markdown (also readable as plain text in a terminal)."""
    if "tasks" in r:
        return format_task_report(r)
    seeds = r.get("seeds") or [0]
    title = f"# Results: {r['run']} ({r['dataset']} classes, preset {r['preset'] or 'paper'}"
    title += f", gate {r.get('gate_mode', 'mask')}"
    lines = [title + (f", seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ")"), ""]
    if "init_weights" in r:  # reports of earlier versions did not record them
        lines += [f"Initial weights: {describe_init_weights(r['init_weights'])}.", ""]
    if len(seeds) > 1:
        lines += _sweep_table(r["summary"], seeds)
        lines += ["", f"Seed {seeds[0]} in detail:", ""]
    lines += _detail_table(r)
    if r.get("pseudo_masks"):
        lines += ["", "Pseudo-mask rows: tissue pixels the mask labels background (ignored by stage 2) are "
                  "left out of the IoU; their share is `background_on_tissue` in report.json."]
    if r.get("ablations"):
        lines += ["", f"## Ablations{f' (seed {seeds[0]})' if len(seeds) > 1 else ''}", "",
                  "| variant | stage-1 CAM mIoU | stage 2 mIoU | stage 2 + gate mIoU |", "|---|---:|---:|---:|"]
        for name, row in r["ablations"].items():
            lines.append(f"| {name} | {_f(row['stage1_cam_test'])} | {_f(row['stage2_test'])} | "
                         f"{_f(row['stage2_test_gate'])} |")
    lines += ["", "## Wall time", "", "| step | seconds | |", "|---|---:|---|"]
    total = 0.0
    for name, t in r["times"].items():
        total += t["seconds"]
        lines.append(f"| {name} | {t['seconds']:.0f} | {'from an earlier run' if t['skipped'] else ''} |")
    lines.append(f"| **total** | **{total:.0f}** | |")
    m = r["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
              + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU") + f", precision {r.get('precision', 'fp32')}."]
    return "\n".join(lines) + "\n"


def _detail_table(r: dict) -> list[str]:
    classes = r["classes"]
    rows: list[tuple[str, dict | None]] = [("stage-1 CAM (test)", (r.get("stage1_cam") or {}).get("test"))]
    for layer, metrics in (r.get("pseudo_masks") or {}).items():
        rows.append((f"pseudo-mask {layer} (train vs train_gt)", metrics))
    rows.append(("stage 2 (test)", r["stage2"]["test"]))
    rows.append(("stage 2 + gate (test)", r["stage2"]["test_gate"]))
    if r.get("upper_bound"):
        rows.append(("upper bound: stage 2 on true masks (test)", r["upper_bound"]["test"]))
        rows.append(("upper bound + gate (test)", r["upper_bound"]["test_gate"]))
    if r.get("transfer"):
        name = Path(r["transfer"]["data"]).name
        rows.append((f"stage 2 tested on {name}", r["transfer"]["test"]))
        rows.append((f"stage 2 + gate tested on {name}", r["transfer"]["test_gate"]))
    lines = ["| result | mIoU | fwIoU | pixel acc | " + " | ".join(f"IoU {c}" for c in classes) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(classes)]
    for name, m in rows:
        if m is None:
            continue
        per = [m["per_class"].get(c, {}).get("iou") for c in classes]
        lines.append(f"| {name} | {_f(m['mIoU'])} | {_f(m['fwIoU'])} | {_f(m['pixel_acc'])} | "
                     + " | ".join(_f(v) for v in per) + " |")
    return lines


def _sweep_table(summary: dict, seeds: Sequence[int]) -> list[str]:
    lines = ["mIoU over the training seeds (mean, worst, best; then each seed):", "",
             "| result | mean | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(seeds)]
    for name, row in summary.items():
        lines.append(f"| {name} | {_f(row['mean'])} | {_f(row['min'])} | {_f(row['max'])} | "
                     + " | ".join(_f(row["per_seed"].get(str(s))) for s in seeds) + " |")
    return lines
