"""How fast effnet.data feeds a model: loading CIFAR-10 from the shared JPEG archive, and images/s of
the full training pipeline (TransformedDataset + make_loader: augment, normalise, collate).

    python benchmarks/data_pipeline.py [--archive ../shared/data/cifar10-jpg.tar.gz] [--data-dir /tmp/effnet-data]

Prints its setup and every figure; compare figures within one run only (the machine is shared).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path

import torch

from effnet.data import TransformedDataset, build_transforms, load_data, make_loader

PREPROCESS = {  # EfficientNet-B0 / Lite0's pretrained_cfg
    "input_size": 224,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pipeline_speed(dataset, batch_size: int, images: int, num_workers: int) -> tuple[float, float]:
    """(images/s of wall time, CPU milliseconds per image including workers). On a shared machine the
    CPU cost is the steadier figure: it does not depend on how many cores other jobs leave us."""
    cpu_before = cpu_seconds()
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, epoch=0, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)  # workers started, caches warm
    seen, started = 0, time.perf_counter()
    for batch, _ in iterator:
        seen += len(batch)
        if seen >= images:
            break
    wall = time.perf_counter() - started
    del iterator, loader  # joins the workers, so their CPU time is counted
    return seen / wall, 1000 * (cpu_seconds() - cpu_before) / (seen + batch_size)


def training_speed(data, size: int, num_workers: int, steps: int, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of real training steps (EfficientNet-Lite0, SGD, channels_last)."""
    import effnet

    model = effnet.create_model("efficientnet_lite0", num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    transform = build_transforms(model.pretrained_cfg, train=True, augment="light", img_size=size)
    dataset = TransformedDataset(data.train, transform, seed=0)
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, num_workers=num_workers)
    seen, started, cpu_before = 0, None, None
    iterator = iter(loader)
    for step, (images, labels) in enumerate(iterator):
        if step == 1:  # the first step warms up
            seen, started, cpu_before = 0, time.perf_counter(), cpu_seconds()
        loss = torch.nn.functional.cross_entropy(model(images.to(memory_format=torch.channels_last)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
        if step == steps:
            break
    wall = time.perf_counter() - started
    del iterator, loader  # joins the workers, so their CPU time is counted
    return seen / wall, 1000 * (cpu_seconds() - cpu_before) / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default=str(DEFAULT_ARCHIVE))
    parser.add_argument("--data-dir", default="/tmp/effnet-data")
    parser.add_argument("--images", type=int, default=1024, help="images timed per configuration")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=8, help="Lite0 training steps per worker setting (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    for attempt in ("first", "second"):
        started = time.perf_counter()
        data = load_data(args.archive, data_dir=args.data_dir)
        print(f"load_data({args.archive}) {attempt} call: {time.perf_counter() - started:.1f} s")
    print(f"train split in memory: {data.train.in_memory}, {tuple(data.train.images.shape)} uint8")

    print(f"\nfull train pipeline, batch {args.batch_size}, {args.images} images per figure, images/s:")
    print("torch threads | workers | size | augment        | images/s | CPU ms/image")
    configs = [
        (1, 0, 224, "light"),
        (1, 0, 128, "light"),
        (1, 0, 224, "randaugment"),
        (1, 0, 224, "trivialaugment"),
        (2, 0, 224, "light"),
        (2, 2, 224, "light"),
        (2, 2, 128, "light"),
        (2, 0, 128, "light"),
    ]
    for threads, workers, size, augment in configs:
        torch.set_num_threads(threads)
        transform = build_transforms(PREPROCESS, train=True, augment=augment, img_size=size)
        dataset = TransformedDataset(data.train, transform, seed=0)
        rate, cpu_ms = pipeline_speed(dataset, args.batch_size, args.images, workers)
        print(f"{threads:13d} | {workers:7d} | {size:4d} | {augment:14s} | {rate:8.0f} | {cpu_ms:12.2f}")

    if args.train_steps:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        print(f"\nEfficientNet-Lite0 training steps at 128 px, batch 32, light, {torch.get_num_threads()} threads:")
        for workers in (0, 2, 0, 2):
            rate, cpu_ms = training_speed(data, 128, workers, args.train_steps, 32)
            print(f"  num_workers={workers}: {rate:.1f} images/s, {cpu_ms:.1f} CPU ms/image")


if __name__ == "__main__":
    main()
