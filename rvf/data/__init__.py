"""Data: the rvf10k dataset, the decode-once cache, transforms and the Kaggle download."""

from rvf.data.cache import DecodedImages, build_cache, collate_batch, default_cache_dir
from rvf.data.dataset import RVF10K, DatasetError, check_same_train, holdout_split, stratified_sample
from rvf.data.device_loader import DeviceLoader, use_device_data
from rvf.data.transforms import (
    BadImageError,
    DataConfig,
    ToUint8,
    build_eval_transform,
    build_train_transform,
    load_image,
    open_rgb,
    resolve_data_config,
)

__all__ = [
    "RVF10K", "DatasetError", "check_same_train", "holdout_split", "stratified_sample",
    "DecodedImages", "DeviceLoader", "use_device_data", "build_cache", "collate_batch", "default_cache_dir",
    "BadImageError", "DataConfig", "ToUint8", "build_eval_transform", "build_train_transform",
    "load_image", "open_rgb", "resolve_data_config",
]
