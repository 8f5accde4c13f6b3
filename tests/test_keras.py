"""Keras EfficientNets into effnet: files real Keras 3 writes (.keras, legacy .h5, .weights.h5), with
random weights and randomised BN statistics, give Keras's logits within 1e-4 on the same images, Keras's
in-model preprocessing becoming our mean and std; a fine-tuned 10-class head; `effnet predict` on them."""

from __future__ import annotations

import json
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported anywhere

from pathlib import Path

import h5py  # noqa: F401  (the [test] extra: missing, it fails rather than skips)
import keras
import numpy as np
import pytest
import torch

import effnet
from effnet.cli import main
from effnet.models.weights import WeightsError

# Keras 3's torch backend converts tensors with np.array(x), which NumPy 2 warns about on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64  # Keras builds any input side >= 32; small keeps B3 fast
IMAGENET_MEAN, IMAGENET_STDDEV = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def randomise(model, seed: int = 0) -> None:
    """BN statistics far from (0, 1), a Normalization of its own and a head with weights large enough
    that the logits spread over several units: agreement on near-zero outputs would prove nothing."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape)])  # fmt: skip
        elif isinstance(layer, keras.layers.Normalization) and not layer.get_weights()[0].any():
            layer.set_weights([rng.uniform(0.3, 0.6, 3), rng.uniform(0.04, 0.09, 3), np.array(0)])
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.5, kernel.shape), rng.normal(0, 0.5, bias.shape)])


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def images(batch: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, SIZE, SIZE, 3)).astype("float32")


def effnet_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """Our model on the same 0-255 pixels, prepared the way our eval transform does: /255, mean, std."""
    pre = model.pretrained_cfg
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(x).numpy()


def keras_logits(model, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(model(pixels, training=False).detach().cpu())


def save_all(model, folder: Path, stem: str) -> list[Path]:
    paths = [folder / f"{stem}.keras", folder / f"{stem}.h5", folder / f"{stem}.weights.h5"]
    model.save(paths[0])
    model.save(paths[1])
    model.save_weights(paths[2])
    return paths


@pytest.fixture(scope="module")
def keras_b0(tmp_path_factory):
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    randomise(model)
    return model, save_all(model, tmp_path_factory.mktemp("keras_b0"), "b0")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, monkeypatch_module):
    """What tutorials do: EfficientNetB0(weights='imagenet', include_top=False), pooling, dropout and
    Dense(10). The ImageNet download is replaced by a local file with the ImageNet Normalization
    values, so the model has Keras's second Rescaling, as the real one has."""
    from keras.src.applications import efficientnet as keras_efficientnet

    folder = tmp_path_factory.mktemp("keras_finetuned")
    donor = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    next(lay for lay in donor.layers if isinstance(lay, keras.layers.Normalization)).set_weights(
        [np.array(IMAGENET_MEAN), np.array(IMAGENET_STDDEV), np.array(0)]
    )
    donor.save_weights(folder / "imagenet.weights.h5")
    local = folder / "imagenet.weights.h5"
    monkeypatch_module.setattr(keras_efficientnet.file_utils, "get_file", lambda *args, **kwargs: local)
    base = keras.applications.EfficientNetB0(weights="imagenet", include_top=False, input_shape=(SIZE, SIZE, 3))
    assert sum(isinstance(layer, keras.layers.Rescaling) for layer in base.layers) == 2
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, name="my_head")(keras.layers.Dropout(0.3)(pooled)))
    randomise(model, seed=2)
    return model, save_all(model, folder, "finetuned")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_keras_b0_files_give_keras_logits(keras_b0) -> None:
    model, paths = keras_b0
    pixels = images()
    expected = keras_logits(model, pixels)
    assert np.abs(expected).max() > 1.0 and expected.std() > 0.1
    for path in paths:
        ours = effnet.create_model("efficientnet_b0", pretrained=path, img_size=SIZE)
        assert ours.config.padding == "same" and ours.config.bn_eps == 1e-3
        diff = np.abs(effnet_logits(ours, pixels) - expected).max()
        assert diff <= 1e-4, f"{path.name}: max abs diff {diff:.2e}"
        assert (effnet_logits(ours, pixels).argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow  # building B3 in Keras: ~7 s here
def test_keras_b3_gives_keras_logits_and_is_told_from_b0(tmp_path: Path, keras_b0) -> None:
    model = keras.applications.EfficientNetB3(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    randomise(model, seed=3)
    path = tmp_path / "b3.keras"
    model.save(path)
    pixels = images(seed=4)
    ours = effnet.create_model("efficientnet_b3", pretrained=path, img_size=SIZE)
    assert np.abs(effnet_logits(ours, pixels) - keras_logits(model, pixels)).max() <= 1e-4
    with pytest.raises(WeightsError, match="shape mismatch"):
        effnet.create_model("efficientnet_b0", pretrained=path)  # B3 weights into B0
    with pytest.raises(WeightsError, match="missing"):
        effnet.create_model("efficientnet_b3", pretrained=keras_b0[1][0])


def test_finetuned_keras_head_and_imagenet_preprocessing(finetuned) -> None:
    model, paths = finetuned
    pixels = images(seed=5)
    expected = keras_logits(model, pixels)
    assert np.abs(expected).max() > 1.0
    for path in paths:
        ours = effnet.create_model("efficientnet_b0", num_classes=10, pretrained=path, img_size=SIZE)
        # Keras's Normalization(variance=std) followed by Rescaling(1/sqrt(std)) is the ImageNet std.
        assert ours.pretrained_cfg["std"] == pytest.approx(IMAGENET_STDDEV, abs=1e-6)
        assert ours.pretrained_cfg["mean"] == pytest.approx(IMAGENET_MEAN, abs=1e-6)
        assert np.abs(effnet_logits(ours, pixels) - expected).max() <= 1e-4, path.name


def test_effnet_predict_on_keras_files(keras_b0, finetuned, tmp_path: Path, capsys) -> None:
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(images(1, seed=6)[0].astype(np.uint8)).save(image)
    for path, classes in ((keras_b0[1][0], 1000), (finetuned[1][2], 10)):
        output = tmp_path / f"{classes}.json"
        assert main(["predict", str(path), str(image), "--top-k", "2", "--backend", "torch", "--json",
                     str(output)]) == 0  # fmt: skip
        assert "photo.png" in capsys.readouterr().out
        top = json.loads(output.read_text())["predictions"][0]["top"]
        assert len(top) == 2 and 0 < top[0]["probability"] <= 1
        # 1,000 classes are ImageNet's (named), a fine-tuned head's are numbered 0..9
        assert str(top[0]["label"]).isdigit() == (classes == 10)


def test_non_efficientnet_keras_file_is_refused(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "tiny.keras"
    model.save(path)
    with pytest.raises(WeightsError, match="no Keras EfficientNet"):
        effnet.create_model("efficientnet_b0", pretrained=path)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="cannot read"):
        effnet.create_model("efficientnet_b0", pretrained=tmp_path / "broken.h5")
