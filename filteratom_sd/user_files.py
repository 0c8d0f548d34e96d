"""Reading the text files a user hands us: bounded in size, UTF-8 only, and YAML as plain data.

A config of `/dev/zero`, a 60 MB caption or a binary prompts file is refused in one sentence
before anything is parsed; YAML loses its aliases (an anchor bomb expands exponentially when
the settings are copied), its explicit tags (`!!python/...`, `!!binary`, `!!set`) and deep nesting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UserInputError

KiB, MiB = 2**10, 2**20
MAX_CONFIG_BYTES = 1 * MiB
MAX_CAPTION_BYTES = 64 * KiB
MAX_CAPTIONS_FILE_BYTES = 16 * MiB
MAX_PROMPTS_FILE_BYTES = 1 * MiB
MAX_YAML_DEPTH = 32


def _size(limit: int) -> str:
    return f"{limit // MiB} MiB" if limit >= MiB else f"{limit // KiB} KiB"


def read_text(path: str | os.PathLike, limit: int, what: str, error: type[UserInputError] = UserInputError) -> str:
    """The UTF-8 text of the file at `path` (at most `limit` bytes); `error` with one sentence otherwise.

    `what` names the file in messages ("config file", "caption file", ...). At most limit + 1
    bytes are read, so a device or an endless file cannot exhaust memory.
    """
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError:
        raise error(f"Cannot read the {what} {file}.") from None
    if len(data) > limit:
        raise error(f"The {what} {file} is larger than {_size(limit)}; is it the right file?")
    if b"\x00" in data:
        raise error(f"The {what} {file} is not a UTF-8 text file.")
    try:
        return data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError:
        raise error(f"The {what} {file} is not a UTF-8 text file.") from None


class _Refused(yaml.YAMLError):
    """A YAML feature that plain settings never need."""


class _PlainLoader(yaml.SafeLoader):
    """The safe loader without aliases, explicit tags or nesting deeper than MAX_YAML_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"aliases (*{event.anchor}) are not allowed")
        if getattr(event, "tag", None) is not None:
            raise _Refused(f"the tag {event.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"it nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, where: str) -> Any:
    """Plain data (mappings, lists, scalars) from YAML text; ConfigError with one sentence naming `where`."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise ConfigError(f"{where} is not valid YAML for settings: {exc}.") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where} is not valid YAML.") from None


def read_yaml_file(path: str | os.PathLike, what: str = "config file", limit: int = MAX_CONFIG_BYTES) -> Any:
    """`parse_yaml` of a bounded UTF-8 file."""
    return parse_yaml(read_text(path, limit, what, ConfigError), f"The {what} {Path(path)}")
