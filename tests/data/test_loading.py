"""Reproducibility of augmentation, loader order and batch mixing; transform outputs."""

from __future__ import annotations

import pytest
import torch

from effnet.data import (
    ImageSplit,
    TransformedDataset,
    build_transforms,
    load_data,
    make_batch_mixer,
    make_loader,
)

PREPROCESS = {
    "input_size": 64,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


@pytest.fixture(scope="module")
def split() -> ImageSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 40, 48), dtype=torch.uint8, generator=generator)
    return ImageSplit([i % 3 for i in range(24)], images=images)


@pytest.mark.parametrize("source_hw", [(40, 48), (8, 8)], ids=["regular", "tiny"])
@pytest.mark.parametrize("augment", ["none", "light", "randaugment", "autoaugment", "trivialaugment"])
def test_train_transform_shape_dtype(augment, source_hw):
    transform = build_transforms(PREPROCESS, train=True, augment=augment)
    out = transform(torch.randint(0, 256, (3, *source_hw), dtype=torch.uint8))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32


def test_img_size_overrides_and_timm_style_input_size():
    transform = build_transforms({**PREPROCESS, "input_size": (3, 224, 224)}, train=False, img_size=96)
    assert transform(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (3, 96, 96)


def test_eval_normalisation_uses_mean_and_std():
    preprocess = {**PREPROCESS, "mean": (0.5, 0.25, 0.0), "std": (0.5, 0.25, 1.0)}
    out = build_transforms(preprocess, train=False)(torch.full((3, 100, 100), 255, dtype=torch.uint8))
    expected = torch.tensor([1.0, 3.0, 1.0]).view(3, 1, 1).expand(3, 64, 64)
    torch.testing.assert_close(out, expected)


def test_eval_crops_large_images_but_keeps_tiny_ones_whole():
    # A bright 1-pixel frame: the ImageNet centre crop cuts it away, the tiny-image rule keeps it.
    def framed(size: int) -> torch.Tensor:
        image = torch.zeros(3, size, size, dtype=torch.uint8)
        image[:, 0, :] = image[:, -1, :] = image[:, :, 0] = image[:, :, -1] = 255
        return image

    preprocess = {**PREPROCESS, "mean": (0, 0, 0), "std": (1, 1, 1), "interpolation": "bilinear"}
    transform = build_transforms(preprocess, train=False)
    assert transform(framed(16))[:, 0, :].mean() > 0.5  # 16 -> 64: resized whole, frame kept
    assert transform(framed(200))[:, 0, :].max() < 0.1  # 200 -> 73 -> crop 64: frame cut away


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="trivialaugment"):
        build_transforms(PREPROCESS, train=True, augment="heavy")


def test_augmentation_is_a_function_of_seed_epoch_index(split):
    transform = build_transforms(PREPROCESS, train=True, augment="randaugment")
    dataset = TransformedDataset(split, transform, seed=7)
    first = dataset[3][0]
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(dataset[3][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], first)
    assert not torch.equal(TransformedDataset(split, transform, seed=8)[3][0], first)


def test_augmentation_leaves_global_rng_alone(split):
    dataset = TransformedDataset(split, build_transforms(PREPROCESS, train=True), seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dataset[0]
    assert torch.equal(torch.rand(3), expected)


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images, labels) for images, labels in loader]


def test_loader_is_identical_across_workers_and_resume(split):
    dataset = TransformedDataset(split, build_transforms(PREPROCESS, train=True), seed=1)
    reference = _batches(make_loader(dataset, batch_size=5, shuffle=True, seed=3, epoch=2, num_workers=0))
    with_workers = _batches(make_loader(dataset, batch_size=5, shuffle=True, seed=3, epoch=2, num_workers=2))
    resumed = _batches(make_loader(dataset, batch_size=5, shuffle=True, seed=3, epoch=2, skip_batches=2))
    assert len(reference) == 5 and len(resumed) == 3
    for (a, la), (b, lb) in zip(reference, with_workers, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(reference[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_loader_order_depends_on_seed_and_epoch(split):
    def order(seed, epoch):
        loader = make_loader(split, batch_size=24, shuffle=True, seed=seed, epoch=epoch)
        return list(loader.sampler)

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(24))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert list(make_loader(split, batch_size=4, shuffle=False, seed=0).sampler) == list(range(24))


def test_loader_follows_a_given_sampler(split):
    sampler = torch.utils.data.DistributedSampler(split, num_replicas=2, rank=1, shuffle=True, seed=4)
    loader = make_loader(split, batch_size=4, shuffle=True, seed=0, epoch=3, sampler=sampler, skip_batches=1)
    sampler.set_epoch(3)
    assert list(loader.sampler) == list(sampler)[4:]


def test_skip_more_batches_than_the_epoch_has_is_an_error(split):
    with pytest.raises(ValueError, match="cannot skip"):
        make_loader(split, batch_size=8, shuffle=True, seed=0, skip_batches=4)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixer_soft_targets_sum_to_one_and_are_reproducible(mixup, cutmix):
    mixer = make_batch_mixer(num_classes=5, mixup_alpha=mixup, cutmix_alpha=cutmix, seed=0)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 5
    mixed, targets = mixer(images, labels, step=11)
    assert mixed.shape == images.shape and targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert (targets.max(dim=1).values < 1).any()  # some mixing happened
    again, targets_again = mixer(images, labels, step=11)
    assert torch.equal(again, mixed) and torch.equal(targets_again, targets)
    assert not torch.equal(mixer(images, labels, step=12)[1], targets)


def test_cutmix_targets_match_pasted_area():
    mixer = make_batch_mixer(num_classes=2, cutmix_alpha=1.0, seed=0)
    images = torch.zeros(2, 1, 20, 20)
    images[1] = 1.0
    labels = torch.tensor([0, 1])
    for step in range(5):
        mixed, targets = mixer(images, labels, step)
        pasted_fraction = mixed[0].mean().item()  # image 0 received pixels of image 1
        assert targets[0, 1].item() == pytest.approx(pasted_fraction)


def test_no_mixer_without_alphas():
    assert make_batch_mixer(num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0, seed=0) is None


def test_digits_split_sizes_and_stratification():
    data = load_data("digits", val_split=0.1, seed=0)
    assert data.class_names == [str(d) for d in range(10)]
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == pytest.approx(180, abs=5)
    image, label = data.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and 0 <= label < 10
    assert int(data.train.images.max()) == 255
    for split in (data.val, data.test):
        counts = torch.bincount(torch.tensor(split.targets), minlength=10)
        assert counts.min() >= 17 and counts.max() <= 19
    again = load_data("digits", val_split=0.1, seed=0)
    assert again.test.targets == data.test.targets and torch.equal(again.test.images, data.test.images)
    assert load_data("digits", val_split=0.1, seed=1).test.targets != data.test.targets
    summary = data.summary()
    assert (
        summary["splits"]["train"]["per_class"]["0"]
        + summary["splits"]["val"]["per_class"]["0"]
        + summary["splits"]["test"]["per_class"]["0"]
        == 178
    )
    assert summary["splits"]["test"]["image_size"]["max_hw"] == [8, 8]


@pytest.mark.parametrize("source_hw", [(40, 48), (8, 8)], ids=["regular", "tiny"])
def test_flip_false_never_mirrors(source_hw):
    """An image whose left half is bright: with flips, some draws put the brightness on the right;
    without, none do (handwriting, where a mirror image is another symbol or none)."""
    image = torch.zeros(3, *source_hw, dtype=torch.uint8)
    image[:, :, : source_hw[1] // 2] = 255
    preprocess = {**PREPROCESS, "mean": (0, 0, 0), "std": (1, 1, 1)}

    def right_brighter_count(flip: bool) -> int:
        transform = build_transforms(preprocess, train=True, augment="light", flip=flip)
        count = 0
        for seed in range(20):
            torch.manual_seed(seed)
            out = transform(image)
            count += int(out[:, :, 32:].mean() > out[:, :, :32].mean())
        return count

    assert right_brighter_count(True) > 0
    assert right_brighter_count(False) == 0


def test_digits_say_mirror_images_change_the_label():
    assert load_data("digits").mirror_safe is False
