"""What a benchmark writes: markdown tables, its JSON file and the versions it ran with.

A result is only worth keeping with what made it, so every benchmark's JSON records the
package versions (`package_versions`) beside its command and numbers.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The packages whose versions move a benchmark's numbers or its ability to run.
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "safetensors",
    "numpy",
    "pyarrow",
    "tokenizers",
    "hydra-core",
    "omegaconf",
    "datasets",
    "fsspec",
    "huggingface-hub",
    "pytest",
)


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """{"python": version, name: installed version or None} for each distribution name."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: the header, the `|---|` rule, one line per row (cells by str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt(value: Any, places: int = 4) -> str:
    """A table cell: floats to `places` decimals, None and NaN as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{places}f}" if isinstance(value, float) else str(value)


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """`data` as JSON (non-JSON values by str), with a final newline; the folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")
