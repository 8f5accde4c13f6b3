"""`effnet eval`, `effnet report` and `effnet cam`: how good is a trained model, and why."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effnet.inference import BACKENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="metrics, confusion matrices, calibration, top losses -> eval.json + PNGs")
    p.add_argument("model", help="run folder (its best.pt and data), checkpoint (.pt) or exported .onnx file")
    p.add_argument("--data", help="data set name, folder or archive (default: the run's own data)")
    p.add_argument("--data-dir", help="where data sets are downloaded/extracted (default: the run's, else the cache)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="test falls back to val if absent")
    p.add_argument("--output", help="output folder (default: RUN_DIR/eval, or <checkpoint>-eval)")
    p.add_argument("--img-size", type=int, help="evaluate at another resolution (default: the model's)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (default auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("report", help="write RUN_DIR/report.html, one self-contained page about a run")
    p.add_argument("run_dir", help="a run folder made by `effnet train`")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="default torch: fp32, as in training")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("cam", help="Grad-CAM of the last stage on images, for one model or several side by side")
    p.add_argument("model", help="run folder, checkpoint or model name")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL", help="more models, shown side by side")
    p.add_argument("--output", help="PNG file (default: RUN_DIR/cam.png, <checkpoint>-cam.png, or in $EFFNET_RUNS/cam)")
    p.set_defaults(func=cmd_cam)


def cmd_eval(args: argparse.Namespace) -> int:
    from effnet.evaluation.evaluate import run_eval
    from effnet.trained import load_trained

    trained = load_trained(args.model)
    if args.output:
        output = Path(args.output)
    elif trained.run_dir:
        output = trained.run_dir / "eval"
    else:
        source = Path(trained.source)
        output = source.with_name(source.stem + "-eval")
    result = run_eval(
        trained, output, args.data, args.split, args.img_size, args.tta, args.backend, args.batch_size, args.data_dir
    )
    print(f"{result['model']} on {result['data']} ({result['split']} split, {result['num_samples']} images)")
    print(f"  top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  loss {result['loss']:.4f}")
    print(f"  macro F1 {result['macro']['f1']:.4f}  weighted F1 {result['weighted']['f1']:.4f}")
    print(f"  ECE {100 * result['ece']:.2f}%")
    print(f"wrote {output / 'eval.json'} and {', '.join(result['figures'].values())}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from effnet.evaluation.report import write_report

    print(f"wrote {write_report(args.run_dir, backend=args.backend)}")
    return 0


def _cam_output(trained) -> Path:
    """Beside the run or checkpoint it explains; a model name has no folder of its own: the runs folder."""
    from effnet.paths import runs_dir

    source = Path(trained.source)
    if trained.run_dir:
        return trained.run_dir / "cam.png"
    return source.with_name(f"{source.stem}-cam.png") if source.is_file() else runs_dir("cam", f"{source.name}.png")


def cmd_cam(args: argparse.Namespace) -> int:
    from effnet.data import BadImageError, read_rgb
    from effnet.data.splits import hwc_to_chw
    from effnet.evaluation.cam import cam_figure
    from effnet.evaluation.plots import save_figure
    from effnet.predict import collect_images
    from effnet.trained import load_trained

    models = [load_trained(source) for source in [args.model, *args.compare]]
    if any(trained.model is None for trained in models):
        raise ValueError("Grad-CAM needs the PyTorch model: give a run folder, checkpoint or model name, not .onnx")
    paths, failures = collect_images(args.images)
    images, titles = [], []
    for path in paths:
        try:
            images.append(hwc_to_chw(read_rgb(path)))
            titles.append(path.name)
        except BadImageError as error:
            failures.append(error)
    for failure in failures:
        print(f"effnet cam: cannot read {failure.path}: {failure.reason}", file=sys.stderr)
    if not images:
        raise ValueError("no readable image given")
    output = args.output or _cam_output(models[0])
    print(f"wrote {save_figure(cam_figure(models, images, titles), output)}")
    return 1 if failures else 0
