"""The comparison as a terminal table, Markdown, CSV and plots (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from effnet.comparison.measure import CompareRow  # noqa: E402

if TYPE_CHECKING:  # finetune imports the training layer, needed here only for the type
    from effnet.comparison.finetune import FinetuneRow


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# (header, cell) for the tables; speed and memory sit beside the costs so that cost per FLOP shows.
COLUMNS: list[tuple[str, Callable[[CompareRow], str]]] = [
    ("model", lambda r: r.name),
    ("res", lambda r: str(r.resolution)),
    ("top-1", lambda r: _number(r.top1, ".1f")),
    ("params M", lambda r: f"{r.params / 1e6:.2f}"),
    ("GMACs", lambda r: f"{r.macs / 1e9:.2f}"),
    ("ms b1", lambda r: _number(r.latency_ms, ".1f")),
    ("img/s", lambda r: _number(r.images_per_s, ".1f")),
    ("GMAC/s", lambda r: _number(r.gmacs_per_s, ".1f")),
    ("infer MB", lambda r: _number(r.inference_mb, ".0f")),
    ("train MB", lambda r: _number(r.training_mb, ".0f")),
    ("vs EfficientNet", lambda r: r.reference.removeprefix("efficientnet_").upper() if r.reference else "-"),
    ("x params", lambda r: _ratio(r.params_ratio)),
    ("x MACs", lambda r: _ratio(r.macs_ratio)),
    ("x img/s", lambda r: _ratio(r.speed_ratio)),
]


def setup_line(rows: Sequence[CompareRow]) -> str:
    measured = next((r for r in rows if r.images_per_s is not None), None)
    if measured is None:
        return "parameters and MACs only (no timing)"
    return (
        f"device {measured.device}, {measured.threads} threads, fp32 channels-last; latency at batch 1, "
        f"img/s at batch {measured.batch_size} (medians); memory: peak at batch {measured.batch_size}, weights included"
    )


def _fixed_width(lines: list[list[str]]) -> str:
    """Text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)])

    return "\n".join(render(line) for line in lines)


def format_table(rows: Sequence[CompareRow]) -> str:
    return _fixed_width([[header for header, _ in COLUMNS]] + [[cell(row) for _, cell in COLUMNS] for row in rows])


LEGEND = """\
- top-1: reference ImageNet top-1 (%) at the model's native resolution `res`, from the source column.
- GMACs: multiply-adds per image at `res`, counted with torch.utils.flop_counter for every model.
- ms b1: latency of one image; img/s: throughput at the batch size above; GMAC/s = img/s x GMACs,
  the compute actually achieved: low for depthwise-convolution networks (EfficientNet, MobileNet).
- infer MB / train MB: peak resident memory (max RSS, a fresh process per model) of inference and of
  an SGD training step at that batch size, weights included.
- vs EfficientNet: the B0-B7 with the fewest MACs whose top-1 is at least the model's (the paper's
  Table 2 pairing); x params, x MACs, x img/s are this model's figure divided by that EfficientNet's.
"""


def to_markdown(rows: Sequence[CompareRow]) -> str:
    headers = [header for header, _ in COLUMNS] + ["top-1 source"]
    lines = [
        f"Setup: {setup_line(rows)}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 2) + ["---"]) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join([cell(row) for _, cell in COLUMNS] + [row.top1_source or "-"]) + " |")
    return "\n".join(lines) + "\n\n" + LEGEND


def write_csv(rows: Sequence[CompareRow], path: Path) -> None:
    """Every field of every row; the spread of throughput as two columns."""
    fields = [f.name for f in dataclasses.fields(CompareRow) if f.name != "images_per_s_range"]
    fields += ["images_per_s_slowest", "images_per_s_fastest", "gmacs_per_s"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            slowest, fastest = row.images_per_s_range or (None, None)
            extra = {"images_per_s_slowest": slowest, "images_per_s_fastest": fastest, "gmacs_per_s": row.gmacs_per_s}
            writer.writerow(dataclasses.asdict(row) | extra)


def _short(name: str) -> str:
    return name.removeprefix("efficientnet_").upper() if name.startswith("efficientnet_") else name


def _scatter_plot(
    rows: Sequence[CompareRow], x: Callable[[CompareRow], float | None], xlabel: str, title: str, path: Path
) -> Path:
    """ImageNet top-1 against `x` (log scale): EfficientNet B0-B7 as a connected line, the rest
    as labelled points, in the style of the paper's Figures 1 and 5."""
    points = [(row, x(row)) for row in rows if row.top1 is not None and x(row)]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    line = sorted(((r, v) for r, v in points if r.is_efficientnet), key=lambda p: p[0].macs)  # B0 to B7
    if line:
        ax.plot([v for _, v in line], [r.top1 for r, _ in line], "-o", color="tab:red", label="EfficientNet", zorder=3)
    for family, color, label in (
        ("efficientnet-lite", "tab:orange", "EfficientNet-Lite"),
        ("torchvision", "tab:blue", "torchvision"),
    ):
        group = [(r, v) for r, v in points if r.family == family]
        if group:
            ax.scatter([v for _, v in group], [r.top1 for r, _ in group], color=color, label=label, zorder=2)
    for row, value in points:
        ax.annotate(_short(row.name), (value, row.top1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ImageNet top-1 (%), reference")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(rows: Sequence[CompareRow], output: Path) -> list[Path]:
    paths = [
        _scatter_plot(
            rows, lambda r: r.macs / 1e9, "GMACs per image (log)", "Accuracy vs MACs", output / "top1_vs_macs.png"
        ),
        _scatter_plot(
            rows,
            lambda r: r.params / 1e6,
            "parameters, millions (log)",
            "Accuracy vs parameters",
            output / "top1_vs_params.png",
        ),
    ]
    if any(row.images_per_s for row in rows):
        paths.append(
            _scatter_plot(
                rows,
                lambda r: r.images_per_s,
                f"measured images/s (log): {setup_line(rows).split(';')[0]}",
                "Accuracy vs measured throughput",
                output / "top1_vs_throughput.png",
            )
        )
    return paths


def write_report(rows: Sequence[CompareRow], output: str | Path) -> list[Path]:
    """compare.md, compare.csv and the plots in `output`; returns the paths written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    markdown, table = output / "compare.md", output / "compare.csv"
    markdown.write_text(to_markdown(rows))
    write_csv(rows, table)
    return [markdown, table, *write_plots(rows, output)]


def format_finetune_table(rows: Sequence[FinetuneRow], markdown: bool = False) -> str:
    headers = [
        "model",
        "init",
        "test acc %",
        "train img/s",
        "train min",
        "wall min",
        "epochs",
        "img size",
        "stopped by",
    ]
    cells = [
        [
            row.name,
            row.init,
            _number(None if row.test_acc is None else 100 * row.test_acc, ".2f"),
            _number(row.train_images_per_s, ".1f"),
            f"{row.train_time_s / 60:.1f}",
            f"{row.wall_time_s / 60:.1f}",
            f"{row.epochs:g}",
            str(row.img_size),
            "budget" if row.stop_reason.startswith("time budget") else row.stop_reason,
        ]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|---|---|" + "---:|" * (len(headers) - 3) + "---|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells]) + "\n"
    return _fixed_width([headers, *cells])


def write_finetune_report(rows: Sequence[FinetuneRow], output: str | Path, setup: str) -> list[Path]:
    """finetune.md, finetune.csv and finetune.png (validation accuracy against training time per
    model, its test accuracy at the end) in `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    markdown, table, plot = output / "finetune.md", output / "finetune.csv", output / "finetune.png"
    markdown.write_text(f"Setup: {setup}.\n\n" + format_finetune_table(rows, markdown=True))
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(rows[0]) if f.name != "curve"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in dataclasses.asdict(row).items() if k != "curve"})

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for row in rows:
        (line,) = ax.plot([s / 60 for s, _ in row.curve], [100 * a for _, a in row.curve], "-o", markersize=3)
        if row.test_acc is not None:
            ax.scatter([row.train_time_s / 60], [100 * row.test_acc], marker="*", s=120, color=line.get_color())
            ax.annotate(
                row.name,
                (row.train_time_s / 60, 100 * row.test_acc),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=8,
            )
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("accuracy (%): validation per epoch, test at the star")
    ax.set_title("Fine-tuning with the same budget")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return [markdown, table, plot]
