"""`effnet models`, `effnet summary`, `effnet scale`: look at the architectures."""

from __future__ import annotations

import argparse

from effnet.models import compound_scale, create_model, get_config, list_models
from effnet.models.efficientnet import EfficientNet
from effnet.models.registry import load_coefficients
from effnet.models.scaling import PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA
from effnet.profiling import count_macs, count_params, layer_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the model variants with resolution, params and MACs")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.add_argument("--no-macs", action="store_true", help="skip counting MACs (faster)")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("summary", help="layer table of a model (output shapes, params, MACs)")
    p.add_argument("model", help="a name from `effnet models`, or 'efficientnet' with --phi")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    p.add_argument("--phi", type=float, help="compound coefficient, with model 'efficientnet'")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=cmd_summary)

    p = subparsers.add_parser("scale", help="compound scaling: multipliers, resolution, params, MACs for a phi")
    p.add_argument("--phi", type=float, required=True, help="compound coefficient (any real >= 0)")
    p.add_argument("--alpha", type=float, help=f"depth base (default {PAPER_ALPHA})")
    p.add_argument("--beta", type=float, help=f"width base (default {PAPER_BETA})")
    p.add_argument("--gamma", type=float, help=f"resolution base (default {PAPER_GAMMA})")
    p.add_argument("--coefficients", help="JSON file with alpha, beta, gamma (from `effnet search`)")
    p.add_argument("--base-resolution", type=int, default=224)
    p.set_defaults(func=cmd_scale)


def cmd_models(args: argparse.Namespace) -> int:
    print(f"{'name':24} {'resolution':>10} {'params':>12} {'MACs':>10}")
    for name in list_models(args.filter):
        config = get_config(name)
        model = EfficientNet(config)
        res = config.preprocess.input_size
        macs = "-" if args.no_macs else f"{count_macs(model, res) / 1e9:.2f}G"
        print(f"{name:24} {res:>10} {count_params(model):>12,} {macs:>10}")
    print("efficientnet (phi=...)   any compound-scaled network: effnet scale --phi 2.5")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    extra = {"phi": args.phi} if args.phi is not None else {}
    model = create_model(args.model, num_classes=args.num_classes, **extra)
    size = args.img_size or model.config.preprocess.input_size
    rows = layer_table(model, size)
    print(f"Model: {args.model}  input: 1x3x{size}x{size}")
    print(f"{'layer':16} {'type':20} {'output shape':22} {'params':>12}")
    print("-" * 73)
    for row in rows:
        print(f"{row.name:16} {row.kind:20} {str(row.output_shape):22} {row.params:>12,}")
    print("-" * 73)
    print(f"Total params: {count_params(model):,}")
    print(f"MACs: {count_macs(model, size) / 1e9:.3f} G (torch.utils.flop_counter, multiply-adds)")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    coefficients = load_coefficients(args.coefficients) if args.coefficients else {}
    for key in ("alpha", "beta", "gamma"):
        if getattr(args, key) is not None:
            coefficients[key] = getattr(args, key)
    result = compound_scale(args.phi, base_resolution=args.base_resolution, **coefficients)
    model = EfficientNet(result.config)
    baseline = EfficientNet(compound_scale(0, base_resolution=args.base_resolution, **coefficients).config)
    macs, base_macs = count_macs(model, result.resolution), count_macs(baseline, args.base_resolution)
    print(f"phi={result.phi:g}  alpha={result.alpha:g}  beta={result.beta:g}  gamma={result.gamma:g}")
    print(f"depth multiplier      alpha^phi = {result.depth_multiplier:.4f}")
    print(f"width multiplier      beta^phi  = {result.width_multiplier:.4f}")
    print(f"resolution multiplier gamma^phi = {result.resolution_multiplier:.4f} -> {result.resolution}px")
    print(
        f"constraint alpha*beta^2*gamma^2 = {result.flops_base:.4f} (target {result.constraint_target:g}, "
        f"{result.constraint_error:+.1%})"
    )
    print(f"stages (channels x repeats): {[(s.channels, s.repeats) for s in result.config.stages]}")
    print(
        f"stem {result.config.stem_channels}, head {result.config.head_channels}, dropout {result.config.drop_rate:.2f}"
    )
    print(f"params {count_params(model):,}   MACs {macs / 1e9:.3f} G")
    print(
        f"MACs vs baseline: x{macs / base_macs:.2f} measured, x{result.expected_flops_multiplier:.2f} "
        "expected from (alpha*beta^2*gamma^2)^phi (channel and repeat rounding explain the gap)"
    )
    return 0
