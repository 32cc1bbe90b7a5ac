"""Datasets (folder readers, built-in synthetic scenes), class names/palettes and training transforms."""
from .classes import get_dataset_meta, list_datasets
from .datasets import (
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    COCOStuff10kDataset,
    DATASET_FORMATS,
    SegmentationFolder,
    build_dataset,
    collate_samples,
    read_image,
)
from .synthetic import SCENE_CLASSES, SCENE_PALETTE, SyntheticScenes
from . import transforms

__all__ = [
    "ADE20KDataset", "CamVidDataset", "CityscapesDataset", "COCOStuff10kDataset", "DATASET_FORMATS",
    "SCENE_CLASSES", "SCENE_PALETTE", "SegmentationFolder", "SyntheticScenes", "build_dataset",
    "collate_samples", "get_dataset_meta", "list_datasets", "read_image", "transforms",
]
