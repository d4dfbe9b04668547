"""What a reader of another tool's folder does with each field of its config: the shared check.

A field that changes what the dictionary computes is either honoured (the reader applies it) or
refused by name when its value is one saetrain cannot reproduce exactly; a field known not to change
it (training settings, provenance) is inert. A field the reader does not know could change the math:
it is a warning naming it, never silence.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from saetrain.errors import UnknownFieldWarning, UnsupportedFieldError


def refuse(path: Path | str, field: str, value: Any, why: str) -> UnsupportedFieldError:
    """The error for a field saetrain does not reproduce (raise it)."""
    return UnsupportedFieldError(f"{path}: {field}={value!r} is not supported: {why}")


def check_fields(
    cfg: Mapping[str, Any],
    path: Path | str,
    known: Collection[str],
    allowed: Mapping[str, Collection[Any]],
) -> None:
    """Refuse a field of `allowed` whose value is not among its allowed values; warn once about the
    fields that are neither in `known` nor in `allowed`."""
    for field, values in allowed.items():
        if field in cfg and cfg[field] not in values:
            choices = ", ".join(repr(v) for v in values)
            raise refuse(path, field, cfg[field], f"saetrain reads only {choices}")
    warn_unknown(path, "fields", set(cfg) - set(known) - set(allowed))


def warn_unknown(path: Path | str, what: str, names: Collection[str]) -> None:
    """Warn, naming them, about `what` (config fields, tensors) that a reader ignored."""
    if names:
        warnings.warn(
            f"{path}: {what} saetrain does not know, which might change what the dictionary "
            f"computes, were ignored: {', '.join(sorted(names))}",
            UnknownFieldWarning,
            stacklevel=3,
        )
