"""circuit-tracer's feature files, so that its graph viewer shows our features.

The viewer (circuit_tracer/frontend) loads `features/index.json.gz`: a gzipped JSON list indexed
by layer, each entry {"filename": "<layer file>.bin", "offsets": [n_features + 1 byte offsets]}
(null entries for layers without features). Feature i of a layer is the byte range
offsets[i]..offsets[i + 1] of its file: a 4-byte little-endian length followed by that many bytes
of zlib-deflated JSON (one record: transcoder_id, index, examples_quantiles, top_logits,
bottom_logits, act_min, act_max, quantile_values, histogram, activation_frequency). The folder
that holds `features/` is what circuit-tracer calls the scan's repository path.

The writer is generic: it takes records per layer, whatever made them (a transcoder per layer, or
a cross-layer transcoder's per-layer encoders).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saetrain.atomic import atomic_write_bytes

FEATURES_DIR = "features"
INDEX_FILE = "index.json.gz"
# The fields circuit-tracer's feature model has (frontend/feature_models.py); records keep only
# these.
FIELDS = (
    "transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min",
    "act_max", "quantile_values", "histogram", "activation_frequency",
)  # fmt: skip
EXAMPLE_FIELDS = ("tokens_acts_list", "train_token_ind", "is_repeated_datapoint", "tokens")


def _circuit_tracer_record(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record[k] for k in FIELDS}
    out["examples_quantiles"] = [
        {
            "quantile_name": q["quantile_name"],
            "examples": [{k: e[k] for k in EXAMPLE_FIELDS} for e in q["examples"]],
        }
        for q in record["examples_quantiles"]
    ]
    return out


def encode_record(record: dict[str, Any]) -> bytes:
    """One feature: 4-byte little-endian length, then the zlib-deflated JSON."""
    body = zlib.compress(json.dumps(_circuit_tracer_record(record)).encode("utf-8"), 6)
    return struct.pack("<I", len(body)) + body


class LayerWriter:
    """`features/layer_<L>.bin`, written a record at a time (in index order), so that no layer's
    records need to be held at once; the file appears under its name only when finished."""

    def __init__(self, folder: Path, layer: int):
        self.layer = layer
        self.name = f"layer_{layer}.bin"
        self.path = Path(folder) / FEATURES_DIR / self.name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(self.name + ".partial")
        self.file = open(self.partial, "wb")  # noqa: SIM115 - closed in finish()
        self.offsets = [0]

    def add(self, record: dict[str, Any]) -> None:
        i = len(self.offsets) - 1
        if record["index"] != i:
            raise ValueError(f"layer {self.layer}: record {i} has index {record['index']}")
        chunk = encode_record(record)
        self.file.write(chunk)
        self.offsets.append(self.offsets[-1] + len(chunk))

    def finish(self) -> dict[str, Any]:
        """Close and rename the file; its entry in the index."""
        self.file.close()
        os.replace(self.partial, self.path)
        return {"filename": self.name, "offsets": self.offsets}


def write_layer(folder: Path, layer: int, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`features/layer_<L>.bin` from records in index order; its index entry."""
    writer = LayerWriter(folder, layer)
    for record in records:
        writer.add(record)
    return writer.finish()


def write_index(folder: Path, entries: dict[int, dict[str, Any]]) -> Path:
    """`features/index.json.gz`: a list indexed by layer, null entries where there is none."""
    if not entries:
        raise ValueError("no layers to index")
    index = [entries.get(layer, {"filename": None, "offsets": None})
             for layer in range(max(entries) + 1)]  # fmt: skip
    path = folder / FEATURES_DIR / INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, gzip.compress(json.dumps(index).encode("utf-8"), mtime=0))
    return path


def write_feature_files(folder: str | Path, layers: dict[int, Iterable[dict[str, Any]]]) -> Path:
    """Every layer's .bin and the index, under `<folder>/features/`; returns the index's path."""
    folder = Path(folder)
    entries = {layer: write_layer(folder, layer, records) for layer, records in layers.items()}
    return write_index(folder, entries)


def read_feature(folder: str | Path, layer: int, index: int) -> dict[str, Any]:
    """One record back, as circuit-tracer's viewer reads it (index, byte range, length, inflate)."""
    folder = Path(folder) / FEATURES_DIR
    entries = json.loads(gzip.decompress((folder / INDEX_FILE).read_bytes()))
    entry = entries[layer]
    if not entry or entry["filename"] is None:
        raise KeyError(f"no features for layer {layer}")
    start, stop = entry["offsets"][index], entry["offsets"][index + 1]
    with open(folder / entry["filename"], "rb") as f:
        f.seek(start)
        chunk = f.read(stop - start)
    (length,) = struct.unpack("<I", chunk[:4])
    return json.loads(zlib.decompress(chunk[4 : 4 + length]))
