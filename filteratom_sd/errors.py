"""Typed exceptions: every library error is one of these, with a one-sentence message."""


class FilterAtomError(Exception):
    """Base class of every error the library raises on purpose."""


class UserInputError(FilterAtomError):
    """The caller passed something invalid (a bad option, a bad value, a bad folder)."""


class ConfigError(UserInputError):
    """A configuration value or preset is invalid."""


class DecompositionError(FilterAtomError):
    """A weight tensor cannot be decomposed with the requested settings."""


class AdapterFormatError(UserInputError):
    """A file is not a readable filteratom-sd adapter."""


class BaseModelMismatchError(UserInputError):
    """An adapter was made for a base model whose weights differ from the one given."""


class DataError(UserInputError):
    """Training images or captions cannot be used."""


class TrainingError(FilterAtomError):
    """Training cannot continue (numerical fault, resource fault)."""
