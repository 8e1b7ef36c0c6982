"""Data: catalogue readers, splits, transforms, image decoding and synthetic data."""

from dermanet.data.catalogue import (
    CATALOGUE_COLUMNS,
    SPLITS,
    CatalogueError,
    class_counts,
    label_indices,
)
from dermanet.data.images import ImageDecodeError, decode_image, index_image_folder, read_image
from dermanet.data.readers import (
    detect_format,
    read_catalogue,
    read_ham10000,
    read_isic2019,
    read_plain_csv,
)
from dermanet.data.splits import assign_splits, class_weights

__all__ = [
    "CATALOGUE_COLUMNS",
    "SPLITS",
    "CatalogueError",
    "ImageDecodeError",
    "assign_splits",
    "class_counts",
    "class_weights",
    "decode_image",
    "detect_format",
    "index_image_folder",
    "label_indices",
    "read_catalogue",
    "read_ham10000",
    "read_image",
    "read_isic2019",
    "read_plain_csv",
]
