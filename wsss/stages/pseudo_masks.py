"""Multi-layer pseudo-masks from the stage-1 classifier (``wsss generate-pm``) and their scores
against the true training masks of synthetic data (``wsss eval-pm``).

Outputs, one palette PNG per training patch and layer (DESIGN.md, "Pseudo-masks")::

    OUT/PM_<layer>/<training file stem>.png   0..C-1 tissue, the spec's background index on white
                                              (specs whose white is background, e.g. luad)
    OUT/pseudo_masks_config.json              the configuration of the last run

Every PNG is written atomically as soon as its batch is done, so an interrupted run leaves only
complete files; a rerun skips patches whose requested masks are all present and valid.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsss import config as cfglib
from wsss.config import PseudoMaskConfig
from wsss.data import stain
from wsss.cam.gradcam import GRADCAM_LAYERS, class_pixel_counts
from wsss.data.datasets import InputNorm
from wsss.data.layout import TrainSample, default_pm_dir, list_images, list_train, pseudo_mask_path, train_gt_dir
from wsss.data.png import READ_ERRORS, check_mask_values, image_size, open_image, read_mask, read_rgb, write_mask
from wsss.data.specs import BACKGROUND_NAME, DatasetSpec
from wsss.errors import WsssError
from wsss.metrics import ConfusionMeter, format_table
from wsss.cam.pseudo_mask import parse_layers, patch_item, pseudo_masks
from wsss.models.loading import classifier_and_spec
from wsss.data import validate
from wsss.data.validate import input_folders
from wsss.runs.journal import diff_settings
from wsss.runs.owner import Owner, file_sha256, owned_folder
from wsss.runtime import (
    Distributed, atomic_path, memory_format, note_saved, progress_bar, resolve_device, resolve_precision,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "pseudo_masks_config.json"


# --------------------------------------------------------------------------- existing outputs


def existing_mask(path: Path, size: tuple[int, int], spec: DatasetSpec) -> np.ndarray | None:
    """The (H, W) mask at ``path`` if it is a complete palette PNG of ``size`` = (H, W) holding only
    class and background values of ``spec``; None when it is missing, truncated, corrupt or does not fit."""
    try:
        with open_image(path) as img:
            if img.mode != "P" or img.size != (size[1], size[0]):
                return None
            img.load()  # decodes every row: a truncated file raises here
            mask = np.asarray(img, dtype=np.uint8)
    except READ_ERRORS:
        return None
    if not mask.size:
        return None
    try:
        check_mask_values(mask, spec, path)
    except WsssError:
        return None
    return mask


# --------------------------------------------------------------------------- data


class PatchesToMask(Dataset):
    """Training patches together with what is already on disk for them.

    Item, a dict: ``index``; ``todo``, the layers whose PNG must be (re)written (all of them with
    ``force``); ``counts`` ``{layer: (256,) int64}`` pixel counts of the valid masks already there.
    When ``todo`` is not empty also ``x`` (3, S, S) model input, ``label`` (C,) bool, ``size``
    (H, W) of the patch, and ``white`` (H, W) bool or None (white is tissue, e.g. BCSS). Checking
    existing PNGs here spreads the resume check over the loader's workers.
    """

    def __init__(self, samples: Sequence[TrainSample], spec: DatasetSpec, layers: Sequence[str], out: Path,
                 norm: InputNorm, model_size: int | None, force: bool, white_rule: str = "grey",
                 reusable: dict[int, tuple[str, ...]] | None = None) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.layers = tuple(layers)
        self.out = Path(out)
        self.norm = norm
        self.model_size = model_size
        self.force = force
        self.white_rule = white_rule
        # {sample index: layers whose mask on disk this run may keep} (None: any valid mask on disk)
        self.reusable = reusable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item: dict = {"index": index, "todo": list(self.layers), "counts": {}}
        if not self.force:
            width, height = image_size(sample.path)
            item["todo"] = []
            keep = self.layers if self.reusable is None else self.reusable.get(index, ())
            for layer in self.layers:
                mask = None
                if layer in keep:
                    mask = existing_mask(pseudo_mask_path(self.out, layer, sample.path), (height, width), self.spec)
                if mask is None:
                    item["todo"].append(layer)
                else:
                    item["counts"][layer] = np.bincount(mask.ravel(), minlength=256)
        if item["todo"]:
            item.update(patch_item(read_rgb(sample.path), sample.label, self.spec, self.norm, self.model_size,
                                   self.white_rule))
        return item


def _keep_list(items: list[dict]) -> list[dict]:
    """DataLoader collate: keep the items; patches are stacked per shape group later."""
    return items


def _shape_groups(items: Sequence[dict]) -> Iterator[list[dict]]:
    """Items to compute, grouped so each group stacks into one tensor (same input and patch size)."""
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        if item["todo"]:
            # tuple(): pin_memory turns tuples into lists
            groups.setdefault((tuple(item["x"].shape), tuple(item["size"])), []).append(item)
    yield from groups.values()


# --------------------------------------------------------------------------- generation


class _MaskWriter:
    """Writes the pseudo-masks of computed items and tallies pixel counts of every value per layer."""

    def __init__(self, samples: Sequence[TrainSample], out: Path, spec: DatasetSpec, layers: Sequence[str],
                 owner: Owner | None = None) -> None:
        self.samples = samples
        self.out = out
        self.spec = spec
        self.owner = owner
        self.palette = spec.flat_palette()
        self.num_values = 256
        self.counts = {layer: np.zeros(self.num_values, np.int64) for layer in layers}
        self.computed = 0
        self.files = 0

    def count_existing(self, items: Sequence[dict]) -> None:
        for item in items:
            for layer, counts in item["counts"].items():
                self.counts[layer] += counts[: self.num_values]

    def write(self, items: Sequence[dict], masks: dict[str, torch.Tensor]) -> None:
        for i, item in enumerate(items):
            path = self.samples[item["index"]].path
            for layer in item["todo"]:
                target = pseudo_mask_path(self.out, layer, path)
                if self.owner is not None:
                    self.owner.set_meta(target, {"source": source_id(path)})
                write_mask(target, masks[layer][i].numpy(), self.palette)
                self.counts[layer] += class_pixel_counts(masks[layer][i], self.num_values).numpy()
                self.files += 1
            self.computed += 1

    def fractions(self) -> dict[str, dict[str, float]]:
        """``{layer: {class name ..., "background": fraction of the pixels}}``."""
        names = [*self.spec.classes, BACKGROUND_NAME]
        values = [*range(self.spec.num_classes), self.spec.background_index]
        out = {}
        for layer, counts in self.counts.items():
            total = max(int(counts.sum()), 1)
            out[layer] = {name: round(int(counts[v]) / total, 6) for name, v in zip(names, values)}
        return out


def generate(cfg: PseudoMaskConfig, progress: bool = True) -> dict:
    """Write the pseudo-masks of every training patch; returns a summary (see :func:`format_summary`).

    The output folder is held for the run. Masks already there are kept only when this folder's
    manifest says a run with the same checkpoint (sha256) and method wrote them from the patch as
    it is now; masks of another checkpoint or method, or that wsss did not write, stop the run with
    one line unless ``force`` (which recomputes everything).

    Under ``torchrun`` the patches are split across the processes (patch ``i`` to rank ``i mod
    world``), each on its own device and under its own lock of the shared folder
    (``OUT/.wsss-lock.rank<r>``); the summary adds up every rank's work, and every rank returns once
    all masks are written."""
    started = time.perf_counter()
    clf, spec = classifier_and_spec(cfg.checkpoint, cfg.dataset, cfg.labels_csv)
    layers = parse_layers(cfg.layers)
    out = cfg.out_dir
    ranks = Distributed(cfg.device)
    try:
        with owned_folder(out, "generate-pm", force=cfg.force, read_from=input_folders(cfg.data),
                          scope=f"rank{ranks.rank}" if ranks.enabled else None) as owner:
            samples, reusable = _prepare(cfg, spec, layers, owner, ranks.is_main)
            mine, kept = _share(samples, reusable, ranks.rank, ranks.world_size)
            writer = _write_all(cfg, spec, layers, mine, clf, kept, owner, progress and ranks.is_main, ranks.device)
        totals = ranks.all_reduce_sum([writer.computed, writer.files, *np.concatenate(list(writer.counts.values()))])
        ranks.barrier()
    finally:
        ranks.close()
    computed, files = int(totals[0]), int(totals[1])
    writer.counts = {layer: np.asarray(totals[2 + i * writer.num_values: 2 + (i + 1) * writer.num_values], np.int64)
                     for i, layer in enumerate(writer.counts)}
    summary = {
        "patches": len(samples),
        "computed": computed,
        "skipped": len(samples) - computed,
        "files_written": files,
        "seconds": round(time.perf_counter() - started, 1),
        "layers": list(layers),
        "out": str(out),
        "class_fractions": writer.fractions(),
    }
    log.info("pseudo-masks: %d patches computed, %d skipped, %.1f s", summary["computed"], summary["skipped"],
             summary["seconds"])
    return summary


def _share(samples: Sequence[TrainSample], reusable: dict[int, tuple[str, ...]] | None, rank: int, world: int):
    """This rank's patches (every ``world``-th from ``rank``) and which of their masks are kept, by
    their index in that share."""
    indices = range(rank, len(samples), world)
    mine = [samples[i] for i in indices]
    kept = None if reusable is None else {j: reusable[i] for j, i in enumerate(indices) if i in reusable}
    return mine, kept


def _prepare(cfg: PseudoMaskConfig, spec: DatasetSpec, layers: Sequence[str], owner: Owner, main: bool = True):
    """Before any Grad-CAM: valid patches and which masks on disk may be kept
    (:func:`reusable_masks`). Returns ``(samples, reusable)``. The ``main`` process writes the config."""
    samples = list_train(cfg.data, spec)
    validate.require(validate.train_problems(samples, spec), cfg.data, spec.name)
    signature = pm_signature(cfg, spec)
    reusable = None if cfg.force else reusable_masks(owner, samples, layers, signature)
    owner.begin({**cfglib.to_dict(cfg), "signature": signature}, {"checkpoint": signature["checkpoint_sha256"]})
    if main:
        owner.claim([owner.folder / CONFIG_NAME])
        _save_config(cfg, owner.folder)
    return samples, reusable


def _write_all(cfg: PseudoMaskConfig, spec: DatasetSpec, layers: Sequence[str], samples, clf, reusable,
               owner: Owner, progress: bool, device: torch.device) -> "_MaskWriter":
    """Compute and write every mask not kept, batch by batch; returns the writer with its tallies."""
    out = owner.folder
    precision = resolve_precision(cfg.precision, device)
    model = clf.model.to(device, memory_format=memory_format(device, precision)).eval()
    loader = DataLoader(
        PatchesToMask(samples, spec, layers, out, clf.norm.for_set(
            lambda: stain.measure_paths([s.path for s in samples], clf.image_size), "the training set"), clf.image_size, cfg.force, cfg.white_rule, reusable),
        batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_keep_list, pin_memory=device.type == "cuda",
    )
    writer = _MaskWriter(samples, out, spec, layers, owner)
    note_saved(f"no pseudo-mask written yet to {out}")

    def write(batch: list[dict], masks: list[tuple[list[dict], dict]], done: int) -> None:
        writer.count_existing(batch)
        for group, group_masks in masks:
            writer.write(group, group_masks)
        note_saved(f"the pseudo-masks of {done} of {len(samples)} patches are in {out} (a rerun keeps them)")

    # PNG encoding and the manifest run in one writer thread while the model computes the next batch
    # (zlib releases the GIL); one batch is in flight at most, and leaving the block (an error, Ctrl-C)
    # waits for it, so what is recorded is on disk.
    done, pending = 0, None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pm-writer") as pool:
        for batch in progress_bar(loader, progress, desc="pseudo-masks", unit="batch"):
            masks = []
            for group in _shape_groups(batch):
                needed = [layer for layer in layers if any(layer in item["todo"] for item in group)]
                masks.append((group, pseudo_masks(model, group, needed, spec, device, cfg.method, precision)))
            done += len(batch)
            if pending is not None:
                pending.result()  # the previous batch is on disk (or its error is raised here)
            pending = pool.submit(write, batch, masks, done)
            del batch, masks  # nothing of a batch outlives its write: memory stays flat over any number of patches
        if pending is not None:
            pending.result()
    stain.log_counts("training patches")
    return writer


def source_id(path: Path) -> list[int]:
    """What identifies a training patch's content cheaply: ``[size, mtime_ns]``."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def pm_signature(cfg: PseudoMaskConfig, spec: DatasetSpec) -> dict:
    """What a pseudo-mask depends on besides its patch: the classifier's bytes, the method and the
    precision of the Grad-CAM passes (bf16 changes a few pixels in a thousand: bench/precision.py)."""
    return {"dataset": spec.name, "checkpoint": str(cfg.checkpoint),
            "checkpoint_sha256": file_sha256(cfg.checkpoint), "tie_rule": cfg.tie_rule,
            "scales": list(cfg.scales), "flip": cfg.flip, "white_rule": cfg.white_rule,
            "precision": resolve_precision(cfg.precision, resolve_device(cfg.device))}


_SIGNATURE_KEYS = ("dataset", "checkpoint_sha256", "tie_rule", "scales", "flip", "white_rule", "precision")


def reusable_masks(owner: Owner, samples: Sequence[TrainSample], layers: Sequence[str],
                   signature: dict) -> dict[int, tuple[str, ...]]:
    """``{sample index: layers}`` whose mask on disk was written by a run with this ``signature``
    from the patch as it is now. Raises (one line) when a mask on disk was not written by wsss or
    comes from another checkpoint or method: recomputing would silently replace it, keeping it would
    silently mix labels of two classifiers."""
    runs = {run.get("run"): run for run in owner.manifest.runs}
    keep: dict[int, tuple[str, ...]] = {}
    foreign, stale = [], []
    for index, sample in enumerate(samples):
        source = None
        ok = []
        for layer in layers:
            path = pseudo_mask_path(owner.folder, layer, sample.path)
            if not path.exists():
                continue
            record = owner.record_of(path)
            if record is None:
                foreign.append(path)
                continue
            written_by = (runs.get(record.get("run")) or {}).get("config", {}).get("signature")
            if isinstance(written_by, dict):
                written_by = {"precision": "fp32", **written_by}  # an older wsss computed in fp32
            if not isinstance(written_by, dict) or diff_settings(written_by, signature, _SIGNATURE_KEYS):
                stale.append((path, written_by or {}))
                continue
            source = source if source is not None else source_id(sample.path)
            if (record.get("meta") or {}).get("source") == source:
                ok.append(layer)
        if ok:
            keep[index] = tuple(ok)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise WsssError(f"{foreign[0]}{more} was not written by wsss here (another tool's pseudo-masks, an older "
                        f"wsss, or edited since): which classifier made it is unknown; pass --force to recompute "
                        f"and replace them, or choose another --out")
    if stale:
        path, old = stale[0]
        diff = diff_settings(old, signature, _SIGNATURE_KEYS)
        made_with = f" (made with {old.get('checkpoint')})" if old.get("checkpoint") else ""
        more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
        raise WsssError(f"{path}{more} come from another run{made_with}: {'; '.join(diff) or 'unrecorded settings'}; "
                        f"pass --force to recompute them all, or choose another --out")
    return keep


def _save_config(cfg: PseudoMaskConfig, out: Path) -> None:
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfglib.to_dict(cfg), indent=2) + "\n")


def format_summary(summary: dict) -> str:
    """A plain-text summary of :func:`generate`: counts, time, and class pixel fractions per layer."""
    lines = [
        f"pseudo-masks in {summary['out']}: {summary['patches']} patches, {summary['computed']} computed, "
        f"{summary['skipped']} skipped, {summary['files_written']} files written, {summary['seconds']} s",
    ]
    fractions = summary["class_fractions"]
    names = list(next(iter(fractions.values())).keys()) if fractions else []
    lines.append(f"{'layer':<8}" + "".join(f" {name[:10]:>10}" for name in names))
    for layer, row in fractions.items():
        lines.append(f"{layer:<8}" + "".join(f" {row[name]:10.4f}" for name in names))
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation


def pm_layers(pm_dir: Path) -> list[str]:
    """Layers with a ``PM_<layer>`` folder under ``pm_dir``: Grad-CAM layers in forward order, others after."""
    found = sorted(p.name[3:] for p in Path(pm_dir).glob("PM_*") if p.is_dir())
    return [n for n in GRADCAM_LAYERS if n in found] + [n for n in found if n not in GRADCAM_LAYERS]


class _PmMeter:
    """Confusion of one layer's pseudo-masks against the true masks, plus background bookkeeping."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.background = spec.background_index
        self.meter = ConfusionMeter(spec.num_classes, spec.background_index)
        self.tissue = self.tissue_as_background = self.gt_background = self.background_kept = 0

    def update(self, pm: np.ndarray, gt: np.ndarray) -> None:
        bg = self.background
        on_tissue = gt != bg
        self.tissue += int(on_tissue.sum())
        self.tissue_as_background += int((on_tissue & (pm == bg)).sum())
        self.gt_background += int((~on_tissue).sum())
        self.background_kept += int((~on_tissue & (pm == bg)).sum())
        # Pixels the pseudo-mask leaves as background carry no class: they are left out of the
        # C×C matrix (and counted in background_on_tissue instead).
        self.meter.update(np.where(pm == bg, 0, pm), np.where(pm == bg, bg, gt))

    def to_json(self, classes: Sequence[str]) -> dict:
        metrics = self.meter.to_json(list(classes))
        metrics["background_on_tissue"] = round(self.tissue_as_background / self.tissue, 6) if self.tissue else None
        metrics["background_recall"] = (round(self.background_kept / self.gt_background, 6)
                                        if self.gt_background else None)
        return metrics


def evaluate(data: Path, spec: DatasetSpec, pm_dir: Path | None = None) -> dict[str, dict]:
    """Score each layer's pseudo-masks against ``DATA/train_gt/`` (synthetic data only).

    Returns ``{layer: metrics}`` with the keys of :func:`wsss.metrics.scores_to_json` plus
    ``background_on_tissue`` and ``background_recall``. The C×C confusion matrix counts pixels
    that are tissue in the true mask (true background, the spec's background value, is never
    evaluated) *and* carry a tissue class in the pseudo-mask. Pixels the pseudo-mask marks as
    background cannot enter a C×C matrix; instead ``background_on_tissue`` is the fraction of
    true-tissue pixels marked background (stage 2 ignores them: lost supervision, not wrong
    supervision), and ``background_recall`` the fraction of true-background pixels marked background.
    """
    gt_dir = train_gt_dir(data)
    if not gt_dir.is_dir():
        raise WsssError(f"{gt_dir} not found: eval-pm needs the true masks of the training patches, "
                        "which only synthetic data sets have (wsss synth writes them)")
    pm_dir = Path(pm_dir) if pm_dir is not None else default_pm_dir(data)
    layers = pm_layers(pm_dir)
    if not layers:
        raise WsssError(f"no PM_<layer> folders in {pm_dir}; run wsss generate-pm first")
    gts = list_images(gt_dir)
    if not gts:
        raise WsssError(f"no masks in {gt_dir}")
    meters = {layer: _PmMeter(spec) for layer in layers}
    for gt_path in progress_bar(gts, True, desc="eval-pm", unit="patch"):
        gt = read_mask(gt_path)
        check_mask_values(gt, spec, gt_path)
        for layer in layers:
            meters[layer].update(_read_pm(pseudo_mask_path(pm_dir, layer, gt_path), gt.shape, spec), gt)
    return {layer: meter.to_json(spec.classes) for layer, meter in meters.items()}


def _read_pm(path: Path, shape: tuple[int, int], spec: DatasetSpec) -> np.ndarray:
    if not path.is_file():
        raise WsssError(f"missing pseudo-mask {path}; run wsss generate-pm first")
    pm = read_mask(path)
    if pm.shape != shape:
        raise WsssError(f"pseudo-mask {path} is {pm.shape[1]}x{pm.shape[0]}, its true mask {shape[1]}x{shape[0]}")
    check_mask_values(pm, spec, path)
    return pm


def format_evaluation(results: dict[str, dict]) -> str:
    """Tables of :func:`evaluate` output, one per layer, and a one-line mIoU comparison."""
    blocks = []
    for layer, metrics in results.items():
        lines = [format_table(metrics, f"pseudo-masks PM_{layer} vs train_gt")]
        lines.append(f"true-tissue pixels marked background {_percent(metrics['background_on_tissue'])}, "
                     f"true-background pixels marked background {_percent(metrics['background_recall'])}")
        blocks.append("\n".join(lines))
    blocks.append("mIoU  " + "  ".join(f"{layer} {_percent(m['mIoU'], 4, False)}" for layer, m in results.items()))
    return "\n\n".join(blocks)


def _percent(value: float | None, digits: int = 1, as_percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{digits}f} %" if as_percent else f"{value:.{digits}f}"


__all__ = [
    "PseudoMaskConfig",
    "PatchesToMask",
    "evaluate",
    "existing_mask",
    "format_evaluation",
    "format_summary",
    "generate",
    "parse_layers",
    "pm_layers",
    "pseudo_masks",
]
