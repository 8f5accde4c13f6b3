"""int8 post-training quantisation: an ONNX file with int8 convolutions, calibrated on the run's own
training images, and its cost measured against fp32 on the run's test split (else val).

ONNX Runtime's static quantisation in QDQ form: weights int8 per output channel (one scale per
filter: EfficientNet's depthwise filters differ in range by orders of magnitude, one scale per tensor
would round the small ones to zero), activations uint8 with ranges from min/max over the
calibration images. Batch norms are folded into the convolutions before the ranges are measured.

What is quantised: every op ONNX Runtime's QDQ quantiser has int8 kernels for (Conv, Gemm, Clip,
Pad, ...), so a Lite model's ReLU6 (Clip) fuses into its convolution and the convolution's output is
rounded over the post-clip range [0, 6]; quantising the convolutions alone rounds that output over
its much wider pre-activation range, which measured far worse. Two layers stay fp32 (`float_ends`):
the stem, which reads the image itself, and the classifier, whose rounding reorders near-tied
logits; together about 1% of the multiply-adds.

EfficientNet's known trouble spots, swish (x * sigmoid(x)) and the squeeze-and-excitation gate
(a sigmoid multiplied onto every channel), stay float: the quantiser has no int8 Sigmoid or Mul, so
they run in fp32 between a DequantizeLinear and the next QuantizeLinear. That is also what they
need: a swish output's range is lopsided (down to -0.28, up to large positive) and an SE gate's
values near 0 and 1 are what it means, both badly served by 256 levels. EfficientNet-Lite (ReLU6,
no SE) has neither, which is why it quantises with the smallest loss.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from effnet.data import DataSplits, ImageSplit, TransformedDataset, build_transforms, make_loader
from effnet.export.onnx import INPUT_NAME, export_onnx, model_metadata, write_onnx_metadata
from effnet.inference import OnnxRuntimeEngine

log = logging.getLogger("effnet")

# Every op ONNX Runtime's QDQ quantiser has int8 kernels for (Conv, Gemm, Clip, Pad, ...); it has none for
# Sigmoid and Mul, so swish and the SE gate stay float (module docstring).
QUANTISED_OPS = None
DEFAULT_CALIBRATION = 512
CALIBRATION_BATCH = 16
THROUGHPUT_SECONDS = 5.0  # timed per model, after a warm-up batch


@dataclass
class Int8Report:
    """fp32 against int8 on one split, both run by ONNX Runtime on this CPU."""

    split: str
    images: int
    fp32_top1: float
    int8_top1: float
    agreement: float  # fraction of images whose top-1 class is the same in both
    fp32_bytes: int
    int8_bytes: int
    fp32_images_per_s: float
    int8_images_per_s: float
    calibration_images: int
    weight_bits: int  # 7 on CPUs without VNNI (see quantize_onnx)
    cpu: str
    fp32_file: str = ""
    backend: str = "onnxruntime"

    def summary(self) -> str:
        return (
            f"{self.split} split, {self.images} images: top-1 fp32 {100 * self.fp32_top1:.2f}% vs int8 "
            f"{100 * self.int8_top1:.2f}% ({100 * (self.int8_top1 - self.fp32_top1):+.2f} points), top-1 agreement "
            f"{100 * self.agreement:.2f}%; file {self.fp32_bytes / 1e6:.2f} MB -> {self.int8_bytes / 1e6:.2f} MB "
            f"({self.fp32_bytes / self.int8_bytes:.1f}x smaller); {self.backend} on {self.cpu}: "
            f"{self.fp32_images_per_s:.0f} -> {self.int8_images_per_s:.0f} img/s "
            f"({self.int8_images_per_s / self.fp32_images_per_s:.2f}x)"
        )


def _quantization():
    try:
        from onnxruntime import quantization
    except ImportError as error:
        raise RuntimeError("int8 export needs ONNX Runtime: pip install 'effnet[export]'") from error
    return quantization


def calibration_batches(
    split: ImageSplit, preprocess: dict[str, Any], count: int, img_size: int, seed: int = 0
) -> list[np.ndarray]:
    """`count` training images drawn without replacement (seeded), through the eval transform: the
    ranges must be those of the images the model will see in deployment, not of augmented ones."""
    if count < 1:
        raise ValueError(f"--calibration must be at least 1 image, got {count}")
    dataset = TransformedDataset(split, build_transforms(preprocess, train=False, img_size=img_size))
    chosen = np.random.default_rng(seed).permutation(len(dataset))[: min(count, len(dataset))]
    images = [dataset[int(index)][0] for index in chosen]
    return [torch.stack(images[i : i + CALIBRATION_BATCH]).numpy() for i in range(0, len(images), CALIBRATION_BATCH)]


def quantize_onnx(
    fp32: str | Path, output: str | Path, batches: list[np.ndarray], weight_bits: int | None = None
) -> Path:
    """Static QDQ quantisation of an fp32 ONNX file (see the module docstring for the choices).

    `weight_bits` 7 (the default on a CPU without VNNI) keeps the weights to 7 bits: without VNNI,
    ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which saturate on full-range
    weights and change predictions (ONNX Runtime's and OpenVINO's documented workaround). With VNNI
    the dot products are exact, and 8 bits are kept."""
    q = _quantization()
    output = Path(output)

    class Reader(q.CalibrationDataReader):
        """Hands out one batch per range (CalibStridedMinMax=1): the calibrator merges each batch's
        min/max into its ranges and drops the activations, instead of holding those of every image."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.items, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="effnet-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        q.shape_inference.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(
            str(prepared),
            str(output),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=QUANTISED_OPS,
            nodes_to_exclude=float_ends(prepared),
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            reduce_range=(weight_bits or default_weight_bits()) == 7,
            extra_options={"CalibStridedMinMax": 1},
        )
    return output


def default_weight_bits() -> int:
    return 8 if has_vnni() else 7


def float_ends(path: Path) -> list[str]:
    """The stem convolution and the classifier, kept in fp32: the stem reads the image itself and
    everything after it inherits its rounding; the classifier's rounding reorders near-tied logits.
    Together they hold about 1% of the multiply-adds."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    convs = [node.name for node in nodes if node.op_type == "Conv"]
    linear = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    return convs[:1] + linear[-1:]


def split_logits(engine, split: ImageSplit, preprocess: dict[str, Any], img_size: int, batch_size: int = 64):
    """Logits and labels of a split in order, through the eval transform."""
    transform = build_transforms(preprocess, train=False, img_size=img_size)
    loader = make_loader(TransformedDataset(split, transform), batch_size, shuffle=False, seed=0)
    logits, labels = [], []
    for images, targets in tqdm(loader, desc=f"eval {engine.name}", leave=False, disable=None):
        logits.append(engine(images).numpy())
        labels.append(np.asarray(targets))
    return np.concatenate(logits), np.concatenate(labels)


def images_per_second(engine, img_size: int, batch: int = 32, seconds: float | None = None) -> float:
    """Best of repeated timed batches after a warm-up: the steadiest figure on a shared CPU."""
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    engine(images)
    best, spent = float("inf"), 0.0
    while spent < (THROUGHPUT_SECONDS if seconds is None else seconds):
        started = time.perf_counter()
        engine(images)
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    return batch / best


def export_int8(
    model: nn.Module,
    output: str | Path,
    splits: DataSplits,
    class_names: list[str] | None = None,
    calibration: int = DEFAULT_CALIBRATION,
    img_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Int8Report]:
    """Quantise `model` (calibrated on `splits.train`), measure it against fp32 on the test split
    (else val), store the report in the file's metadata and a sidecar JSON; return (file, report)."""
    output = Path(output)
    size = img_size or model.config.preprocess.input_size
    evaluated = splits.test if splits.test is not None else splits.val
    if evaluated is None:
        raise ValueError(f"{splits.source} has neither a test nor a validation split to measure int8 against fp32")
    name = "test" if evaluated is splits.test else "val"
    metadata = model_metadata(model, class_names, **(extra or {}))
    metadata["preprocess"]["input_size"] = size
    fp32_name = output.name.replace(".int8", ".fp32") if ".int8" in output.name else f"{output.stem}.fp32.onnx"
    fp32 = output.with_name(fp32_name)
    export_onnx(model, fp32, size, metadata)
    started = time.perf_counter()
    bits = default_weight_bits()
    quantize_onnx(fp32, output, calibration_batches(splits.train, metadata["preprocess"], calibration, size), bits)
    log.info(
        "quantised to int8 in %.0f s on %d calibration images; weights in %d bits%s",
        time.perf_counter() - started,
        calibration,
        bits,
        "" if bits == 8 else " (this CPU has no VNNI, where full-range int8 weights saturate)",
    )
    engines = {"fp32": OnnxRuntimeEngine(fp32), "int8": OnnxRuntimeEngine(output)}
    fp32_logits, labels = split_logits(engines["fp32"], evaluated, metadata["preprocess"], size)
    int8_logits, _ = split_logits(engines["int8"], evaluated, metadata["preprocess"], size)
    report = Int8Report(
        split=name,
        images=len(labels),
        fp32_top1=float((fp32_logits.argmax(1) == labels).mean()),
        int8_top1=float((int8_logits.argmax(1) == labels).mean()),
        agreement=float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
        fp32_bytes=fp32.stat().st_size,
        int8_bytes=output.stat().st_size,
        fp32_images_per_s=images_per_second(engines["fp32"], size),
        int8_images_per_s=images_per_second(engines["int8"], size),
        calibration_images=min(calibration, len(splits.train)),
        weight_bits=bits,
        cpu=cpu_name(),
        fp32_file=str(fp32),
    )
    metadata["int8"] = asdict(report)
    write_onnx_metadata(output, metadata)
    output.with_name(output.name + ".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return output, report


def cpu_name() -> str:
    """The CPU's model name and its int8-relevant features (VNNI runs uint8 x int8 dot products)."""
    model, features = _cpu_features()
    return f"{model} ({', '.join(features) or 'no VNNI'})"


def has_vnni() -> bool:
    return bool(_cpu_features()[1])


def _cpu_features() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", []
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "CPU")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model, [name for name in ("avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
