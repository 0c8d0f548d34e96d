"""filteratom-sd: teach Stable Diffusion a concept by tuning only filter atoms."""

from .adapter_io import read_adapter, read_adapter_metadata, save_adapter
from .alpha_cache import decompose_unet
from .config import FilterAtomConfig
from .decompose import decompose_conv, decompose_linear
from .errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    ConfigError,
    DataError,
    DecompositionError,
    FilterAtomError,
    TrainingError,
    UserInputError,
)
from .inject import add_adapter, add_filter_atoms, remove_adapter
from .pipeline import fuse_adapter, load_adapter, set_adapter_scale, unfuse_adapter, unload_adapter

__all__ = [
    "AdapterFormatError",
    "BaseModelMismatchError",
    "ConfigError",
    "DataError",
    "DecompositionError",
    "FilterAtomConfig",
    "FilterAtomError",
    "TrainingError",
    "UserInputError",
    "add_adapter",
    "add_filter_atoms",
    "decompose_conv",
    "decompose_linear",
    "decompose_unet",
    "fuse_adapter",
    "load_adapter",
    "read_adapter",
    "read_adapter_metadata",
    "remove_adapter",
    "save_adapter",
    "set_adapter_scale",
    "unfuse_adapter",
    "unload_adapter",
]
