"""Save and load dictionaries in the SAELens layout: cfg.json + sae_weights.safetensors.

Tensor names and shapes are SAELens's (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec,
plus `threshold`, `W_skip`, gated's `b_gate`/`b_mag`/`r_mag`), and cfg.json carries the fields
SAELens's `SAE.load_from_disk` reads: `architecture` (SAELens's name: standard, gated, topk,
jumprelu, transcoder, skip_transcoder, jumprelu_transcoder, ...), `d_in`, `d_sae`, `d_out` and
`hook_name_out` for transcoders, `reshape_activations` ("hook_z" for an attention SAE on
`attn.hook_z`), the architecture's own fields (e.g. `k`) and a `metadata` block (model, hook,
context). BatchTopK and Matryoshka dictionaries are saved as the JumpReLU they are at
inference. The legacy top-level fields of older SAELens versions are written too. Weights are
saved for raw activations: the training normalisation is folded in before saving. A dictionary on
`mlp_in` is saved for TransformerLens's `ln2.hook_normalized`, before the norm's affine (see
norm_space.py), with the affine beside it; loading undoes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from saetrain.atomic import atomic_write_bytes, atomic_write_json
from saetrain.dictionaries import SAELENS_LOADERS, Dictionary
from saetrain.errors import UnsupportedFieldError
from saetrain.export.formats import FORMAT_FILES, folder_format
from saetrain.export.norm_space import (
    NORM_FILE,
    Affine,
    affine_tensors,
    from_norm_space,
    read_affines,
    to_norm_space,
)
from saetrain.export.read_dictionary_learning import (
    dictionary_learning_metadata,
    read_dictionary_learning,
)
from saetrain.export.read_sparsify import read_sparsify, sparsify_metadata
from saetrain.export.saelens_fields import honour_saelens_fields

CFG_FILE, WEIGHTS_FILE = FORMAT_FILES["saelens"]
RUN_FILE = "saetrain_run.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _reshape_activations(metadata: dict[str, Any]) -> str:
    """SAELens's `reshape_activations`: "hook_z" for a dictionary reading `attn.hook_z`, whose
    TransformerLens activation is [.., n_heads, d_head] and which SAELens flattens to d_in =
    n_heads × d_head (the head-major order of our attn_z); "none" otherwise."""
    return "hook_z" if str(metadata.get("hook_name", "")).endswith(".attn.hook_z") else "none"


def saelens_config(dictionary: Dictionary, metadata: dict[str, Any]) -> dict[str, Any]:
    """cfg.json's content for a dictionary; `metadata` is SAELens's metadata block."""
    cfg: dict[str, Any] = {
        "architecture": dictionary.saelens_architecture(),
        "d_in": dictionary.d_in,
        "d_sae": dictionary.n_latents,
        "dtype": _DTYPE_NAMES[dictionary.W_enc.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": dictionary.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": _reshape_activations(metadata),
        **dictionary.saelens_fields(),
        "metadata": metadata,
    }
    if dictionary.transcoder:
        cfg["d_out"] = dictionary.d_out
    # Older SAELens versions read these at the top level; SAELens's transcoders read the *_out ones
    # there too.
    for key in (
        "model_name",
        "hook_name",
        "hook_layer",
        "context_size",
        "prepend_bos",
        "hook_name_out",
        "hook_layer_out",
    ):
        if key in metadata:
            cfg[key] = metadata[key]
    cfg["activation_fn_str"] = cfg["architecture"]
    cfg["activation_fn_kwargs"] = dictionary.saelens_fields()
    return cfg


def save_dictionary(
    dictionary: Dictionary,
    folder: str | Path,
    metadata: dict[str, Any],
    run_info: dict[str, Any] | None = None,
    norm_affines: tuple[Affine | None, Affine | None] | None = None,
) -> Path:
    """Write cfg.json, the weights and (optionally) the run's record into `folder`, atomically.

    `norm_affines` (input, target): the sides read before a norm's affine in TransformerLens
    (`mlp_in`); the weights are written for that space and the affines beside them, which
    `load_dictionary` undoes (saetrain/export/norm_space.py).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata)
    sidecar = folder / NORM_FILE
    if norm_affines is not None and any(a is not None for a in norm_affines):
        dictionary = to_norm_space(dictionary, *norm_affines)
        # Before the weights: a folder never holds rewritten weights without the way back.
        atomic_write_bytes(sidecar, safetensors_bytes(affine_tensors(*norm_affines)))
        metadata["saetrain_norm_affine_folded"] = [
            side for side, a in zip(("input", "target"), norm_affines, strict=True) if a is not None
        ]
    else:
        sidecar.unlink(missing_ok=True)
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in dictionary.saelens_tensors().items()
    }
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write_json(folder / CFG_FILE, saelens_config(dictionary, metadata))
    if run_info is not None:
        atomic_write_json(folder / RUN_FILE, run_info)
    return folder


def load_dictionary(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary folder of any format saetrain reads (export/formats.py): SAELens's
    layout (saetrain's own, or another tool's), sparsify's or dictionary_learning's."""
    folder = Path(folder)
    readers = {
        "saelens": read_saelens,
        "sparsify": read_sparsify,
        "dictionary_learning": read_dictionary_learning,
    }
    return readers[folder_format(folder)](folder).to(device).eval()


def folder_metadata(folder: str | Path) -> dict[str, Any]:
    """Where a folder of any format says it was trained, under SAELens's names (`model_name`,
    `hook_name`, `hook_name_out`, `context_size`, …) and saetrain's (`saetrain_site`, …): a SAELens
    cfg.json's metadata block over its top-level fields (older versions keep them there); what
    sparsify's and dictionary_learning's configs say, where they say it."""
    folder = Path(folder)
    fmt = folder_format(folder)
    if fmt == "sparsify":
        return sparsify_metadata(folder)
    if fmt == "dictionary_learning":
        return dictionary_learning_metadata(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    return {**cfg, **(cfg.get("metadata") or {})}


def read_saelens(folder: Path) -> Dictionary:
    """A folder in the SAELens layout, every cfg.json field that changes the math honoured or
    refused by name (export/saelens_fields.py)."""
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(weights_path, device="cpu")
    cfg, tensors, fold_b_dec = honour_saelens_fields(cfg, tensors, cfg_path)
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_LOADERS:
        raise UnsupportedFieldError(
            f"{cfg_path}: architecture={arch!r} is not supported; known: "
            f"{', '.join(SAELENS_LOADERS)}"
        )
    for name in ("W_enc", "W_dec"):  # a CLT's decoders are W_dec.0, W_dec.1, …
        if name not in tensors and f"{name}.0" not in tensors:
            raise ValueError(f"{weights_path} lacks the tensor {name}")
    try:
        dictionary = SAELENS_LOADERS[arch].from_saelens(cfg, tensors)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{folder}: the tensors do not fit architecture={arch!r}: {e}") from None
    if fold_b_dec:  # an SAE whose encoder reads x, not x − b_dec (apply_b_dec_to_input: false)
        dictionary.absorb_input_shift(dictionary.b_dec.detach().clone())
    affines = read_affines(folder)
    if affines is not None:  # written for TransformerLens's pre-affine hook: back to the model's
        dictionary = from_norm_space(dictionary, *affines)
    return dictionary
