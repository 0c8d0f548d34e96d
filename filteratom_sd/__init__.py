"""filteratom-sd: teach Stable Diffusion a concept by tuning only filter atoms."""

from .core.adapter_file import read_adapter, read_adapter_metadata, save_adapter
from .core.api import fuse_adapter, load_adapter, merge_and_unload, set_adapter_scale, unfuse_adapter, unload_adapter
from .core.inject import add_adapter, remove_adapter
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
from .filter_atoms.cache import decompose_unet
from .filter_atoms.config import FilterAtomConfig
from .filter_atoms.functional import decompose_conv, decompose_linear
from .filter_atoms.method import add_filter_atoms

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
    "merge_and_unload",
    "read_adapter",
    "read_adapter_metadata",
    "remove_adapter",
    "save_adapter",
    "set_adapter_scale",
    "unfuse_adapter",
    "unload_adapter",
]
