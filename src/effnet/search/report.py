"""What a search shows: the table of runs (terminal, CSV, Markdown), the chosen coefficients as a
JSON file that `create_model(..., coefficients=FILE)` and `effnet scale --coefficients` read, and
two figures: accuracy per candidate, and the single-dimension study (the paper's Figures 3-4)."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import effnet
from effnet.search.grid import PAPER_COEFFICIENTS, Coefficients
from effnet.search.plan import SearchPlan, run_name
from effnet.training.checkpoint import write_json

RECIPE_KEYS = ("epochs", "batch_size", "lr", "optimizer", "augment", "precision", "seeds")
COLUMNS = (
    ("kind", "kind", "{}"),
    ("alpha", "alpha", "{:.2f}"),
    ("beta", "beta", "{:.2f}"),
    ("gamma", "gamma", "{:.2f}"),
    ("phi", "phi", "{:g}"),
    ("ideal_flops_x", "ideal FLOPs x", "{:.2f}"),
    ("measured_flops_x", "measured FLOPs x", "{:.2f}"),
    ("macs_m", "MACs (M)", "{:.1f}"),
    ("params_k", "params (k)", "{:.0f}"),
    ("resolution", "res", "{}"),
    ("val_acc", "val acc %", "{:.2f}"),
    ("val_acc_std", "+-", "{:.2f}"),
    ("time_s", "time s", "{:.0f}"),
    ("note", "note", "{}"),
)


def table_rows(plan: SearchPlan, finished: dict[str, dict], seeds: int) -> list[dict[str, Any]]:
    """One row per planned run: coefficients, measured cost, mean accuracy over finished seeds."""
    base_macs = plan.baseline_macs
    rows = []
    for spec in plan.runs():
        measured = plan.cost(spec)
        runs = [finished[run_name(spec, seed)] for seed in range(seeds) if run_name(spec, seed) in finished]
        accs = [100 * r["val_acc"] for r in runs]
        notes = []
        if spec.coefficients == PAPER_COEFFICIENTS:
            notes.append("paper's")
        if any(r["stop_reason"] != "completed" for r in runs):
            notes.append("time cap hit")
        if len(runs) < seeds:
            notes.append(f"{len(runs)}/{seeds} seeds" if runs else "not run")
        rows.append(
            {
                "run": spec.key,
                "kind": spec.kind,
                "alpha": spec.coefficients.alpha,
                "beta": spec.coefficients.beta,
                "gamma": spec.coefficients.gamma,
                "phi": spec.phi,
                "ideal_flops_x": spec.coefficients.flops_factor**spec.phi,
                "measured_flops_x": measured.macs / base_macs,
                "macs_m": measured.macs / 1e6,
                "params_k": measured.params / 1e3,
                "resolution": measured.resolution,
                "val_acc": statistics.mean(accs) if accs else None,
                "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "time_s": statistics.mean(r["train_time_s"] for r in runs) if runs else None,
                "seeds_done": len(runs),
                "complete": len(runs) == seeds,
                "note": ", ".join(notes),
            }
        )
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate with the best mean validation accuracy (ties: fewer measured MACs)."""
    done = [r for r in rows if r["kind"] == "candidate" and r["complete"]]
    return max(done, key=lambda r: (r["val_acc"], -r["macs_m"])) if done else None


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cells = [[header for _, header, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) if row[key] is not None else "-" for key, _, fmt in COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "---|" * len(COLUMNS))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    )


def write_all(
    output: Path, plan: SearchPlan, rows: list[dict[str, Any]], chosen: dict[str, Any] | None, complete: bool
) -> Path | None:
    """results.csv, results.md, the figures and (once a candidate is done) coefficients.json."""
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output / "results.md").write_text(_markdown(plan, rows, chosen, complete))
    plot_candidates(rows, output / "candidates.png")
    plot_single_dimension(rows, chosen, output / "single_dimension.png")
    if chosen is None:
        return None
    path = output / "coefficients.json"
    write_json(path, coefficients_record(plan, rows, chosen, complete))
    return path


def coefficients_record(
    plan: SearchPlan, rows: list[dict[str, Any]], chosen: dict[str, Any], complete: bool
) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "alpha": chosen["alpha"],
        "beta": chosen["beta"],
        "gamma": chosen["gamma"],
        "flops_factor": Coefficients(chosen["alpha"], chosen["beta"], chosen["gamma"]).flops_factor,
        "target": recipe.target,
        "provenance": {
            "tool": f"effnet search (effnet {effnet.__version__})",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": plan.source,
            "proxy": dataclasses.asdict(recipe.proxy),
            "recipe": {k: getattr(recipe, k) for k in RECIPE_KEYS},
            "train_images": plan.train_images,
            "val_images": recipe.val_images,
            "val_acc": chosen["val_acc"],
            "measured_flops_x": chosen["measured_flops_x"],
            "candidates_trained": sum(r["kind"] == "candidate" and r["complete"] for r in rows),
            "candidates_planned": sum(r["kind"] == "candidate" for r in rows),
            "search_complete": complete,
            "selection": plan.note,
        },
    }


def _markdown(plan: SearchPlan, rows: list[dict[str, Any]], chosen: dict[str, Any] | None, complete: bool) -> str:
    lines = [
        "# Compound-scaling search",
        "",
        f"Data: {plan.source}; {plan.train_images} training images x {plan.recipe.epochs} epoch(s) per "
        f"run, scored on {plan.recipe.val_images} held-out validation images.",
        f"Proxy: {dataclasses.asdict(plan.recipe.proxy)}.",
        f"Selection: {plan.note}.",
        "",
        format_table(rows, markdown=True),
        "",
    ]
    if chosen:
        lines.append(
            f"Chosen: alpha={chosen['alpha']:.2f}, beta={chosen['beta']:.2f}, gamma={chosen['gamma']:.2f} "
            f"({chosen['val_acc']:.2f}% validation accuracy)" + ("" if complete else " - search not complete")
        )
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_candidates(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy per candidate, best at the top, labelled by coefficients and measured
    FLOPs factor; the chosen one and the paper's coloured, the baseline as a dashed line."""
    plt = _pyplot()
    done = [r for r in rows if r["kind"] == "candidate" and r["val_acc"] is not None]
    done.sort(key=lambda r: (r["val_acc"], -r["macs_m"]))  # the order `choose` ranks them in
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.35 * len(done)))
    best = done[-1] if done else None
    colours = ["C3" if r is best else "C1" if "paper" in r["note"] else "C0" for r in done]
    ax.barh(range(len(done)), [r["val_acc"] for r in done], xerr=[r["val_acc_std"] or 0 for r in done], color=colours)
    labels = [
        f"a={r['alpha']:.2f} b={r['beta']:.2f} g={r['gamma']:.2f}  x{r['measured_flops_x']:.2f}"
        + ("  (paper)" if "paper" in r["note"] else "")
        for r in done
    ]
    ax.set_yticks(range(len(done)), labels, fontsize=8)
    values = [r["val_acc"] for r in done]
    base = next((r for r in rows if r["kind"] == "baseline" and r["val_acc"] is not None), None)
    if base:
        ax.axvline(base["val_acc"], color="gray", linestyle="--", label=f"baseline (phi=0) {base['val_acc']:.1f}%")
        values.append(base["val_acc"])
        ax.legend(loc="lower right", fontsize=8)
    if values:
        ax.set_xlim(max(0.0, min(values) - 5), max(values) + 3)
    ax.set_xlabel("validation accuracy (%)")
    ax.set_title("Candidates at phi=1 (label: coefficients, measured FLOPs x baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_single_dimension(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Path) -> None:
    """Accuracy against measured FLOPs when scaling only depth, only width, only resolution, or
    all three with the chosen coefficients (the paper's Figures 3 and 4), from the baseline."""
    plt = _pyplot()
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {kind: [r for r in rows if r["kind"] == kind] for kind in ("depth", "width", "resolution", "compound")}
    if chosen:
        curves["compound"].append(chosen)
    for index, (kind, points) in enumerate(curves.items()):
        points = sorted([base, *points] if base else points, key=lambda r: r["measured_flops_x"])
        points = [p for p in points if p["val_acc"] is not None]
        if len(points) > 1:
            ax.plot(
                [p["measured_flops_x"] for p in points],
                [p["val_acc"] for p in points],
                marker="os^D"[index],
                label=kind if kind != "compound" else "compound (chosen coefficients)",
            )
    ax.set_xlabel("measured FLOPs (x baseline)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Scaling one dimension vs compound scaling")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
