"""Data for effnet: data sets, image folders and archives, validation of images, transform presets,
reproducible loaders and batch mixing. Takes a model's preprocessing as plain values; imports no model."""

from effnet.data.folders import extract_archive, load_image_folder
from effnet.data.images import BadImageError, read_rgb
from effnet.data.loading import TransformedDataset, make_loader
from effnet.data.mixing import BatchMixer, make_batch_mixer
from effnet.data.sources import NAMED_DATASETS, load_data
from effnet.data.splits import DataSplits, ImageSplit, stratified_split
from effnet.data.transforms import AUGMENT_PRESETS, build_transforms, flip_tta

__all__ = [
    "AUGMENT_PRESETS",
    "NAMED_DATASETS",
    "BadImageError",
    "BatchMixer",
    "DataSplits",
    "ImageSplit",
    "TransformedDataset",
    "build_transforms",
    "extract_archive",
    "flip_tta",
    "load_data",
    "load_image_folder",
    "make_batch_mixer",
    "make_loader",
    "read_rgb",
    "stratified_split",
]
