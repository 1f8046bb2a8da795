"""The ``wsss`` command line. Parses options, calls the library; nothing else imports Typer."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from wsss.errors import WsssError

app = typer.Typer(
    name="wsss",
    help="Weakly-supervised tissue segmentation of histopathology patches from patch-level labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatasetOpt = typer.Option(..., "--dataset", help="Dataset spec: luad or bcss.")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic dataset into."),
    train: int = typer.Option(1000, "--train", min=1, help="Training patches."),
    val: int = typer.Option(100, "--val", min=1, help="Validation patches."),
    test: int = typer.Option(100, "--test", min=1, help="Test patches."),
    size: int = typer.Option(224, "--size", min=32, help="Patch side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed; same seed, same files."),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it already holds a dataset."),
) -> None:
    """Generate a synthetic H&E dataset in the LUAD-HistoSeg layout (plus train_gt/ masks)."""
    from wsss.data.synth import generate

    if not force and out.is_dir() and any(out.iterdir()):
        raise WsssError(f"{out} is not empty; pass --force to write into it anyway")
    summary = generate(out, n_train=train, n_val=val, n_test=test, size=size, seed=seed, workers=workers)
    typer.echo(json.dumps(summary, indent=2))


@app.command("check-data")
def check_data(
    root: Path = typer.Argument(..., help="Dataset folder (train/, val/ or valid/, test/)."),
    dataset: str = DatasetOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
) -> None:
    """Count patches, labels and mask pixels; list every problem. Exit 1 if there is any."""
    from wsss.data.check import check_dataset, format_report, report_to_json
    from wsss.data.specs import get_spec
    from wsss.metrics import write_json

    spec = get_spec(dataset)
    report = check_dataset(root, spec, progress=sys.stderr.isatty())
    typer.echo(format_report(report, spec))
    if json_out is not None:
        write_json(json_out, report_to_json(report, spec))
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user errors become one ``error:`` line and exit status 1, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except WsssError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
