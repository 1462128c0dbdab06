"""Building a frozen config dataclass from a config file's mapping: the one place unknown and missing fields
are reported (a typo must not be ignored). Values are validated by each dataclass's __post_init__."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from glmjax.errors import ConfigError


def check_fields(cls: type, values: Mapping[str, Any], name: str) -> None:
    """ConfigError "<name>.<field>: unknown field" / "<name>.<field>: required" for `cls`'s fields."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    for key in values:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown field (known: {', '.join(sorted(known))})")
    for f in fields:
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name}.{f.name}: required")


def from_mapping(cls: type, values: Mapping[str, Any]):
    """cls(**values) after check_fields, errors named by the class."""
    check_fields(cls, values, cls.__name__)
    return cls(**values)
