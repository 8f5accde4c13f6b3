"""report.html: one self-contained page about a run (every figure embedded as a base64 PNG), the file to
send to a teacher or a manager. Written by `effnet report RUN_DIR` and at the end of every training run.

The page evaluates the run's best.pt afresh on the run's own data (test split, or validation when there
is none), so its numbers are those of the model in the folder, whatever happened since training.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from effnet.data import DataSplits
from effnet.evaluation.evaluate import load_run_data, run_eval
from effnet.evaluation.plots import plot_image_grid, save_figure
from effnet.files import atomic_write_text
from effnet.profiling import count_macs, count_params
from effnet.trained import Trained, load_trained

SAMPLES_PER_CLASS = 5
MANY_CLASSES = 20  # above this, the sample figure shows one image per class

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --accent:#2f6fdf; --bg:#f5f7fa; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(120deg,#1e3a8a,#2f6fdf); color:white; padding:28px 40px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; }
header p { margin:0; opacity:.85; }
main { max-width:1180px; margin:0 auto; padding:24px 40px 60px; }
section { background:white; border:1px solid var(--line); border-radius:10px; padding:20px 24px; margin:20px 0; }
h2 { margin:0 0 14px; font-size:19px; font-weight:600; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(130px,1fr)); gap:12px; margin-top:-44px; }
.card { background:white; border:1px solid var(--line); border-radius:10px; padding:14px 16px;
        box-shadow:0 2px 6px rgba(0,0,0,.06); }
.card .value { font-size:24px; font-weight:650; color:var(--accent); }
.card .label { font-size:12px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; }
th { background:#f0f4f8; font-weight:600; position:sticky; top:0; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr:nth-child(even) td { background:#fafbfc; }
.scroll { max-height:460px; overflow:auto; border:1px solid var(--line); border-radius:6px; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:16px; align-items:start; }
figure { margin:0; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:white; }
.narrow figure img { max-width:720px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.muted { color:var(--muted); }
code { background:#eef2f7; padding:1px 5px; border-radius:4px; font-size:13px; }
@media (max-width:900px) { .grid2 { grid-template-columns:1fr; } main { padding:16px; } }
"""


def write_report(run_dir: str | Path, data: DataSplits | None = None, backend: str = "torch") -> Path:
    """Evaluate the run's best.pt, draw the figures (in RUN_DIR/eval) and write RUN_DIR/report.html.

    The default backend is PyTorch in fp32, so the page's accuracy is the one the training loop
    measured (results.json), not one shifted by a reduced-precision backend."""
    run_dir = Path(run_dir)
    trained = load_trained(run_dir)
    splits = data if data is not None else load_run_data(trained)
    eval_dir = run_dir / "eval"
    evaluation = run_eval(trained, eval_dir, splits, backend=backend)
    samples = save_figure(sample_figure(splits), eval_dir / "samples.png")
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    page = render(trained, splits, evaluation, results, eval_dir, samples)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path


def sample_figure(splits: DataSplits):
    """A few training images per class (one per class when there are many classes)."""
    split = splits.train
    per_class = 1 if len(splits.class_names) > MANY_CLASSES else SAMPLES_PER_CLASS
    chosen: dict[int, list[int]] = {label: [] for label in range(len(splits.class_names))}
    for index, label in enumerate(split.targets):
        if len(chosen[label]) < per_class:
            chosen[label].append(index)
    indices = [i for label in chosen for i in chosen[label]]
    images = [split[i][0].permute(1, 2, 0).numpy() for i in indices]
    titles = [splits.class_names[split.targets[i]] for i in indices]
    columns = 10 if per_class == 1 else per_class
    return plot_image_grid(images, titles, columns=columns)


def _image(path: Path, caption: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    def cell(tag: str, value: Any, index: int) -> str:
        css = ' class="num"' if index >= numeric_from else ""
        return f"<{tag}{css}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _count(value: int) -> str:
    """1234 -> '1.2 k', 5288548 -> '5.29 M', 390e6 -> '390 M', 1.8e9 -> '1.80 G'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            number = value / scale
            return f"{number:.3g} {unit}" if number < 100 else f"{number:,.0f} {unit}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def render(
    trained: Trained,
    splits: DataSplits,
    evaluation: dict[str, Any],
    results: dict[str, Any],
    eval_dir: Path,
    samples: Path,
) -> str:
    """The page's HTML (see CSS above); only standard library string building, no template engine."""
    model = trained.model
    size = evaluation["img_size"]
    params, macs = count_params(model), count_macs(model, size)
    split = evaluation["split"]
    cards = [
        (f"{split} top-1", _pct(evaluation["top1"])),
        (f"{split} top-5", _pct(evaluation["top5"])),
        ("macro F1", f"{evaluation['macro']['f1']:.3f}"),
        ("calibration error", _pct(evaluation["ece"])),
        ("parameters", _count(params)),
        (f"MACs at {size}px", _count(macs)),
        ("training time", _duration(results.get("wall_time_s"))),
    ]
    cards_html = "".join(
        f'<div class="card"><div class="value">{html.escape(v)}</div><div class="label">{html.escape(k)}</div></div>'
        for k, v in cards
    )
    overall = _table(
        ["metric", "value"],
        [
            ["top-1 accuracy", _pct(evaluation["top1"])],
            ["top-5 accuracy", _pct(evaluation["top5"])],
            ["loss (cross-entropy)", f"{evaluation['loss']:.4f}"],
            ["expected calibration error (15 bins)", _pct(evaluation["ece"])],
            *[
                [f"{avg} {key}", f"{evaluation[avg][key]:.4f}"]
                for avg in ("macro", "weighted")
                for key in ("precision", "recall", "f1")
            ],
            ["images evaluated", f"{evaluation['num_samples']:,}"],
            ["best validation accuracy (training)", _pct(results.get("best_val_acc"))],
            ["best epoch", results.get("best_epoch", "-")],
        ],
    )
    per_class = _table(
        ["class", "precision", "recall", "F1", "support"],
        [
            [r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
            for r in evaluation["per_class"]
        ],
    )
    figures = evaluation["figures"]

    def figure(key: str, caption: str) -> str:
        return (
            _image(eval_dir / figures[key], caption)
            if key in figures
            else f'<p class="muted">No {caption.lower()}.</p>'
        )

    summary = splits.summary()
    split_names = list(summary["splits"])
    counts = _table(
        ["class", *split_names],
        [[name, *[summary["splits"][s]["per_class"].get(name, 0) for s in split_names]] for name in splits.class_names]
        + [["total", *[summary["splits"][s]["count"] for s in split_names]]],
    )
    config_rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in trained.run_config.items()]
    config_table = _table(["setting", "value"], config_rows, numeric_from=2)
    throughput = f"{results['images_per_s']:.1f} images/s" if results.get("images_per_s") else "-"
    cost_rows = [
        ["model", trained.model_name],
        ["parameters", f"{params:,}"],
        [f"MACs per image at {size}px", f"{macs:,}"],
        ["wall time", _duration(results.get("wall_time_s"))],
        ["training throughput (last epoch)", throughput],
        ["device", results.get("device", "-")],
        ["epochs run", results.get("epochs_run", "-")],
        ["stop reason", results.get("stop_reason", "-")],
    ]
    cost_table = _table(["", "value"], cost_rows, numeric_from=2)
    curves = figure("curves", "Loss, accuracy and learning rate per epoch (metrics.csv)")
    title = f"{trained.model_name} on {evaluation['data']}"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>effnet report: {html.escape(title)}</title><style>{CSS}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p>Run <code style="background:rgba(255,255,255,.15);color:white">{html.escape(str(trained.run_dir))}</code> &middot;
{evaluation["num_samples"]:,} {split} images at {size}px &middot; report written {stamp}</p></header>
<main>
<div class="cards">{cards_html}</div>
<section><h2>Metrics on the {split} split</h2><div class="grid2"><div>{overall}</div>
<div class="scroll">{per_class}</div></div></section>
<section><h2>Training curves</h2>{curves}</section>
<section><h2>Confusion matrices</h2><div class="grid2">
{figure("confusion_counts", "Counts: rows are true classes, columns predicted")}
{figure("confusion_normalised", "Row-normalised: each row sums to 1 (recall on the diagonal)")}</div></section>
<section class="narrow"><h2>Most confidently wrong</h2>
{figure("top_losses", "Misclassified images with the highest loss")}</section>
<section><h2>Calibration</h2><div class="grid2">{figure("reliability", "Reliability diagram")}
<p>Expected calibration error: <b>{_pct(evaluation["ece"])}</b>, the average gap between confidence and accuracy,
weighted by the share of images in each confidence bin. A well calibrated model's bars reach their red lines;
bars below them mean over-confidence.</p></div></section>
<section><h2>Data set</h2><p>{html.escape(summary["source"])}: {summary["num_classes"]} classes,
{summary["bad_images"]} unreadable image(s) left out.</p>
<div class="grid2"><div class="scroll">{counts}</div>{_image(samples, "Sample training images")}</div></section>
<section><h2>Model and cost</h2>{cost_table}</section>
<section><h2>Configuration</h2><div class="scroll">{config_table}</div></section>
<p class="muted">Written by effnet. Figures and eval.json are in <code>{html.escape(str(eval_dir))}</code>.</p>
</main></body></html>
"""
