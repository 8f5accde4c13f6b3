"""Exports of a trained model: ONNX and TorchScript (`checked`), int8 ONNX (`int8`), and the
neighbours' layouts: safetensors with a config.json, timm and torchvision state dicts (`neighbours`).

This package's own namespace holds only the file writers and readers of `effnet.export.onnx`,
which import nothing from `effnet.inference`, so that inference can use them to run a module on
ONNX Runtime without an import circle. The exports that also run their file and check it against
PyTorch sit above inference, in the submodules.
"""

from effnet.export.onnx import export_onnx, export_torchscript, model_metadata, read_onnx_metadata

__all__ = ["export_onnx", "export_torchscript", "model_metadata", "read_onnx_metadata"]
