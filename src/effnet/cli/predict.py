"""`effnet predict` and `effnet export`: use a trained model outside training."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from effnet.inference import BACKENDS
from effnet.paths import runs_dir

log = logging.getLogger("effnet")

EXPORT_FORMATS = ("onnx", "torchscript", "safetensors", "timm", "torchvision")
NEIGHBOUR_SUFFIXES = {"safetensors": "-safetensors", "timm": ".timm.pth", "torchvision": ".torchvision.pth"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k labels for image files, folders or globs")
    p.add_argument("model", help="run folder, checkpoint (.pt), exported .onnx file, or a model name (ImageNet)")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (default auto)")
    p.add_argument("--tta", action="store_true", help="average with the mirror image (twice the compute)")
    p.add_argument("--json", metavar="FILE", help="also write the predictions and failures as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser(
        "export", help="export to ONNX (optionally int8), TorchScript, safetensors, timm or torchvision, checked"
    )
    p.add_argument("model", help="run folder, checkpoint (.pt), Keras file or model name")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                   help="onnx | torchscript | safetensors (a folder: model.safetensors + config.json) | timm | "
                   "torchvision (state dicts their create_model/efficientnet_bN load with strict=True)")  # fmt: skip
    p.add_argument("--int8", action="store_true", help="ONNX with int8 convolutions, calibrated on the run's "
                   "training images; prints and stores top-1, agreement, size and img/s against fp32")  # fmt: skip
    p.add_argument("--calibration", type=int, default=512, metavar="N", help="calibration images for --int8 (512)")
    p.add_argument("--data", help="for --int8: data set to calibrate on and measure with (default: the run's)")
    p.add_argument("--data-dir", help="for --int8: where the data set is (default: the run's data_dir)")
    p.add_argument(
        "--output", help=f"output file (default: beside the checkpoint; for a model name {runs_dir('export')})"
    )
    p.add_argument("--img-size", type=int, help="resolution recorded in the metadata and traced (default: the model's)")
    p.set_defaults(func=cmd_export)


def cmd_predict(args: argparse.Namespace) -> int:
    from effnet.predict import collect_images, format_table, predict_files, write_csv, write_json
    from effnet.trained import load_trained

    paths, failures = collect_images(args.images)
    trained = load_trained(args.model)
    engine = trained.engine(args.backend, args.img_size)
    predictions, unreadable = predict_files(
        trained, paths, engine, args.top_k, args.batch_size, args.img_size, args.tta
    )
    failures += unreadable
    print(format_table(predictions))
    for failure in failures:
        print(f"effnet predict: cannot read {failure.path}: {failure.reason}", file=sys.stderr)
    if args.json:
        write_json(args.json, predictions, failures)
    if args.csv:
        write_csv(args.csv, predictions)
    log.info("%d image(s) predicted with %s, %d failed", len(predictions), engine.name, len(failures))
    return 1 if failures or not predictions else 0


def cmd_export(args: argparse.Namespace) -> int:
    from effnet.export.checked import FORMATS, export_model
    from effnet.trained import load_trained

    if args.int8 and args.format != "onnx":
        raise ValueError(f"--int8 writes ONNX; drop --format {args.format} or --int8")
    trained = load_trained(args.model)
    if trained.model is None:
        raise ValueError(f"{args.model} is already an exported ONNX file; export a run folder or checkpoint")
    source = Path(trained.source)
    # A model name has no folder of its own: its export goes to the runs folder, not the current one.
    stem = (source / "best") if source.is_dir() else source.with_suffix("") if source.exists() else None
    stem = stem or runs_dir("export", source.name)
    suffix = ".int8.onnx" if args.int8 else {**FORMATS, **NEIGHBOUR_SUFFIXES}[args.format]
    output = Path(args.output) if args.output else stem.with_name(stem.name + suffix)
    if args.int8:
        return _export_int8(trained, output, args)
    if args.format in NEIGHBOUR_SUFFIXES:
        return _export_neighbour(trained, output, args.format)
    path, sidecar, parity = export_model(
        trained.model, output, args.format, trained.class_names, args.img_size, extra={"source": trained.source}
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {sidecar}")
    print(
        f"parity with PyTorch on {parity['batch']} images (dynamic batch): max abs diff {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {100 * parity['top1_agreement']:.0f}%"
    )
    return 0 if parity["max_abs_diff"] <= 1e-4 else 1


def _export_int8(trained, output: Path, args: argparse.Namespace) -> int:
    from effnet.evaluation.evaluate import load_run_data
    from effnet.export.int8 import export_int8

    splits = load_run_data(trained, args.data, args.data_dir)
    path, report = export_int8(
        trained.model, output, splits, trained.class_names, args.calibration, args.img_size, {"source": trained.source}
    )
    print(f"wrote {path} ({report.int8_bytes / 1e6:.2f} MB) and {path}.json; fp32 for comparison: {report.fp32_file}")
    print(f"int8 vs fp32 on the {report.summary()}")
    return 0


def _export_neighbour(trained, output: Path, fmt: str) -> int:
    from effnet.export.neighbours import export_neighbour, export_safetensors

    extra = {"source": trained.source}
    if fmt == "safetensors":
        path, parity = export_safetensors(trained.model, output, trained.class_names, extra)
        print(f"wrote {path}/model.safetensors and {path}/config.json")
    else:
        path, sidecar, parity = export_neighbour(trained.model, output, fmt, trained.class_names, extra)
        print(f"wrote {path} and {sidecar}: {json.loads(sidecar.read_text())['load']}")
    if not parity:
        print(f"{fmt} is not installed here: the file was not loaded back to check it")
        return 0
    print(f"reloaded in {fmt}: max abs diff {parity['max_abs_diff']:.2e} on {parity['batch']} images, top-1 agreement "
          f"{100 * parity['top1_agreement']:.0f}%")  # fmt: skip
    return 0 if parity["max_abs_diff"] <= parity["allowed_diff"] else 1
