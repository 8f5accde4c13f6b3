"""A small trained run made by `effnet.fit` (a tiny EfficientNet on scikit-learn's digits at 32 px),
shared by the evaluation tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from eval_helpers import tiny_model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run folder (best.pt, config.yaml, metrics.csv, results.json, report.html) from
    `effnet.fit`: the tiny model trained on a quarter of digits' training images (for speed; the
    validation and test splits are digits' own, so eval and report reload them by name)."""
    from effnet.data import load_data, stratified_split
    from effnet.training import TrainConfig, fit

    root = tmp_path_factory.mktemp("eval-run")
    splits = load_data("digits", data_dir=str(root / "data"))
    quarter = stratified_split(splits.train.targets, [0.75], seed=0)[0]
    result = fit(
        tiny_model(num_classes=10, img_size=32),
        dataclasses.replace(splits, train=splits.train.subset(quarter)),
        TrainConfig(data="digits"),  # the name, recorded in config.yaml
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        lr=0.01,
        warmup_steps=3,
        label_smoothing=0.0,
        workers=0,
        precision="fp32",
        progress=False,
        output=str(root / "run"),
        data_dir=str(root / "data"),
    )
    return result.run_dir
