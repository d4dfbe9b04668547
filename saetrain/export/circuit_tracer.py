"""Export transcoder sets and cross-layer transcoders (CLTs) in circuit-tracer's own layout.

circuit-tracer (PyPI `circuit-tracer`, not a dependency) builds its replacement model from a folder
holding `config.yaml` and safetensors files; this module writes such folders from plain tensors and
reads them back. It never imports circuit-tracer: the format below was read from circuit-tracer
0.5.0's loaders (`transcoder/single_layer_transcoder.py`, `transcoder/cross_layer_transcoder.py`,
`utils/hf_utils.py`, `utils/caching.py`) and is checked against the real package by
`tests/interop/test_circuit_tracer_load.py`.

Inputs are in saetrain's (SAELens's) orientation — `W_enc [d_in, n]`, `W_dec [n, d_out]`,
`W_skip [d_out, d_in]` — and already folded for raw activations (the training normalisation
applied, as for a SAELens export); the writers transpose `W_enc` to circuit-tracer's feature-major
`[n, d]`. Files:

- transcoder set (`model_kind: transcoder_set`): `layer_{i}.safetensors` for i = 0..m−1 with
  `W_enc [n, d]`, `W_dec [n, d]`, `b_enc [n]`, `b_dec [d]`, and `activation_function.threshold [n]`
  (JumpReLU) and `W_skip [d, d]` when present. No other tensor may be in a file: circuit-tracer
  loads every tensor of it into its module with a strict `load_state_dict`.
- CLT (`model_kind: cross_layer_transcoder`): per layer i, `W_enc_{i}.safetensors` with
  `W_enc_{i} [n, d]`, `b_enc_{i} [n]`, `b_dec_{i} [d]` (the bias of *output* layer i) and
  `threshold_{i} [n]` (JumpReLU), and `W_dec_{i}.safetensors` with `W_dec_{i} [n, L − i, d]`, whose
  slot j decodes to layer i + j. circuit-tracer 0.5.0 reads no skip connection from these files.

`config.yaml` carries `model_kind`, `feature_input_hook` and `feature_output_hook` (hook names
relative to `blocks.{l}.`, see `circuit_tracer_hooks`), for a TopK set `activation: topk` and `k`,
optionally `scan` and a `transcoders` list of hf:// URIs, and a `saetrain` block (ignored by
circuit-tracer) saying what was exported. It is written last, and removed first when a folder is
rewritten: circuit-tracer treats a folder with `config.yaml` as complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from saetrain.activations.sites import Site
from saetrain.atomic import atomic_write_bytes
from saetrain.errors import CircuitTracerExportError, SiteError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TRANSCODER_SET = "transcoder_set"
CLT = "cross_layer_transcoder"
THRESHOLD_KEY = "activation_function.threshold"
Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")

# For the README and the export's log: which circuit-tracer reads what.
TOPK_COMPATIBILITY = (
    "A TopK transcoder set is written with `activation: topk` and `k` in config.yaml. Only "
    "circuit-tracer's main branch reads them (decoderesearch/circuit-tracer pull request #94, "
    "merged 2026-04-16; per-layer transcoders only, no TopK CLT). circuit-tracer 0.5.0 (PyPI) "
    "ignores both keys and loads the set as plain ReLU transcoders without a warning: every "
    "feature with a positive pre-activation fires, so its graphs are wrong. circuit-tracer's TopK "
    "module keeps the k largest pre-activations even when negative, where saetrain's TopK zeroes "
    "those: the two agree whenever at least k pre-activations are positive. Use a TopK set with "
    "circuit-tracer installed from its main branch, or train BatchTopK / Matryoshka / JumpReLU "
    "transcoders, which export as the JumpReLU they compute at inference and load exactly in "
    "0.5.0."
)

# Our site kinds → circuit-tracer's hook names (relative to `blocks.{l}.`). circuit-tracer reads a
# transcoder's input where the MLP reads (or the residual stream just before its norm) and writes
# the MLP's output; no other site fits its replacement model, which swaps each MLP.
_INPUT_KINDS = ("resid_mid", "mlp_in")
_OUTPUT_KINDS = ("mlp_out",)
_GEMMA_FAMILIES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class TranscoderLayer:
    """One layer of a transcoder set, SAELens orientation, for raw activations.

    W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]; threshold [n] for JumpReLU (a feature fires
    when its pre-activation is > threshold); W_skip [d, d] (output = ... + x·W_skipᵀ).
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    W_skip: Tensor | None = None


@dataclass(frozen=True)
class CLTTensors:
    """A cross-layer transcoder over layers 0..L−1, SAELens orientation, for raw activations.

    Per source layer i: W_enc[i] [d, n], b_enc[i] [n], threshold[i] [n] (JumpReLU), and
    W_dec[i] [n, L − i, d] whose slot j decodes to layer i + j. b_dec[j] [d] is output layer j's
    bias. Layer j's output is Σ_{i ≤ j} codes_i · W_dec[i][:, j − i] + b_dec[j].
    """

    W_enc: Sequence[Tensor]
    b_enc: Sequence[Tensor]
    W_dec: Sequence[Tensor]
    b_dec: Sequence[Tensor]
    threshold: Sequence[Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.W_enc)


@dataclass
class ExportResult:
    """What a writer wrote: the folder, its files (config.yaml last), the config, and warnings."""

    folder: Path
    files: list[str]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TranscoderSetFiles:
    """A transcoder set read back: its config.yaml and its layers (SAELens orientation)."""

    config: dict[str, Any]
    layers: dict[int, TranscoderLayer]


@dataclass(frozen=True)
class CLTFiles:
    """A CLT read back: its config.yaml and its tensors (SAELens orientation)."""

    config: dict[str, Any]
    tensors: CLTTensors


# -- hook names ----------------------------------------------------------------------------------


def circuit_tracer_hooks(
    input_site: str | Site,
    target_site: str | Site,
    *,
    family: str | None = None,
    mlp_hook_out: bool = False,
) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook) for a transcoder from `input_site` to
    `target_site`, as circuit-tracer names them: relative to `blocks.{l}.`, which it prepends.

    - `resid_mid.L` → `hook_resid_mid` (sites.py's TransformerLens name);
    - `mlp_in.L` → `mlp.hook_in`: circuit-tracer wraps every MLP with a hook on its input, the
      norm's output with the norm's weight, which is our `mlp_in`. TransformerLens's
      `ln2.hook_normalized` (the SAELens alias in sites.py) is x/scale *before* the weight in the
      unfolded model circuit-tracer loads (`fold_ln=False`), so it is not written here (the
      SAELens folder is saved for it instead: export/norm_space.py);
    - `mlp_out.L` → `hook_mlp_out` (sites.py's name; for Gemma the output after the post-MLP
      norm, as ours), or `mlp.hook_out` with `mlp_hook_out=True` (the wrapped MLP's output; what
      circuit-tracer's nnsight backend needs for Qwen 3). Refused for Gemma families, whose
      `mlp.hook_out` is before the post-MLP norm and so not the tensor trained on.

    Anything else raises CircuitTracerExportError: circuit-tracer's replacement model swaps each
    layer's MLP, so a transcoder must read that layer's MLP input (or resid_mid) and write its MLP
    output, at one layer.
    """
    try:
        src = input_site if isinstance(input_site, Site) else Site.parse(input_site)
        dst = target_site if isinstance(target_site, Site) else Site.parse(target_site)
    except SiteError as err:
        raise CircuitTracerExportError(str(err)) from None
    if src.kind not in _INPUT_KINDS or dst.kind not in _OUTPUT_KINDS:
        raise CircuitTracerExportError(
            f"circuit-tracer cannot use a transcoder {src.name} → {dst.name}: its replacement "
            "model replaces each layer's MLP, so the input must be resid_mid.L or mlp_in.L and "
            "the target mlp_out.L (same L)"
        )
    if src.layer != dst.layer:
        raise CircuitTracerExportError(
            f"circuit-tracer reads and writes each transcoder at one layer; {src.name} → "
            f"{dst.name} crosses layers (a cross-layer transcoder is written by write_clt)"
        )
    input_hook = "mlp.hook_in" if src.kind == "mlp_in" else _relative(src)
    if mlp_hook_out:
        if family in _GEMMA_FAMILIES:
            raise CircuitTracerExportError(
                f"mlp.hook_out of a {family} model is the MLP's output before its post-MLP norm, "
                "not mlp_out (after it); use hook_mlp_out (mlp_hook_out=False)"
            )
        return input_hook, "mlp.hook_out"
    return input_hook, _relative(dst)


def _relative(site: Site) -> str:
    """sites.py's TransformerLens hook name without its `blocks.{L}.` prefix."""
    prefix = f"blocks.{site.layer}."
    name = site.tl_hook_name
    assert name.startswith(prefix), name
    return name[len(prefix) :]


def hooks_for_layers(sites: Mapping[int, tuple[str, str]], **kwargs: Any) -> tuple[str, str]:
    """The hook names of a whole set (or CLT) from each layer's (input site, target site): every
    layer must use the same kinds at its own layer, since config.yaml names one pair for all."""
    if not sites:
        raise CircuitTracerExportError("no layers given")
    found: dict[tuple[str, str], list[int]] = {}
    for layer, (src, dst) in sorted(sites.items()):
        for name in (src, dst):
            if Site.parse(name).layer != layer:
                raise CircuitTracerExportError(
                    f"layer {layer} was given the site {name!r}, which is at another layer"
                )
        found.setdefault(circuit_tracer_hooks(src, dst, **kwargs), []).append(layer)
    if len(found) > 1:
        detail = "; ".join(f"{a} → {b} at layers {ls}" for (a, b), ls in found.items())
        raise CircuitTracerExportError(
            f"config.yaml names one input and one output hook for every layer, got: {detail}"
        )
    return next(iter(found))


# -- layer coverage ------------------------------------------------------------------------------


def coverage_warning(
    layers: Iterable[int], n_model_layers: int | None, padded_bytes: int = 0
) -> str | None:
    """The warning for a set or CLT that covers fewer than the model's layers, which the writers
    pad to the model's layer count (None if it covers them all, or when the model's layer count
    is not known). `padded_bytes`: what the padding adds to the files."""
    covered = sorted(set(layers))
    if n_model_layers is None or covered == list(range(n_model_layers)):
        return None
    missing = sorted(set(range(n_model_layers)) - set(covered))
    return (
        f"covers layers {_ranges(covered)} of a {n_model_layers}-layer model (missing "
        f"{_ranges(missing)}): written padded to all {n_model_layers} layers, the missing ones as "
        "latents that never fire (zero encoder rows and bias, zero decoders and output bias), "
        "because circuit-tracer's replacement model replaces every layer's MLP (0.5.0's "
        "attribute() fails on a CLT with fewer layers than the model, and a set with fewer "
        "loses the missing layers from its graph). In its graphs the missing layers' MLP outputs "
        "are wholly error nodes, and the padded latents are never active"
        + (
            f"; the padding adds {_size(padded_bytes)} of zeros to the files"
            if padded_bytes
            else ""
        )
    )


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024  # type: ignore[assignment]
    raise AssertionError


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _check_contiguous(layers: Iterable[int], what: str) -> list[int]:
    """circuit-tracer numbers its files 0..m−1 and refuses a gap (TranscoderSet's assertion; the
    CLT loader counts files), so anything else cannot be written as a loadable folder."""
    covered = sorted(set(layers))
    if covered != list(range(len(covered))) or not covered:
        raise CircuitTracerExportError(
            f"a circuit-tracer {what} needs layers 0..m−1 without gaps; got {_ranges(covered)} "
            f"(missing {_ranges(sorted(set(range(max(covered, default=-1) + 1)) - set(covered)))})"
        )
    return covered


def _covered(layers: Iterable[int], n_model_layers: int | None, what: str) -> list[int]:
    """The trained layers, sorted: any layers of the model when its layer count is known (the
    writers pad the rest), else 0..m−1."""
    if n_model_layers is None:
        return _check_contiguous(layers, what)
    covered = sorted(set(layers))
    if not covered:
        raise CircuitTracerExportError(f"a circuit-tracer {what} needs at least one layer")
    if covered[0] < 0 or covered[-1] >= n_model_layers:
        raise CircuitTracerExportError(
            f"layers {_ranges(covered)} exported for a model with {n_model_layers} layers "
            f"(0..{n_model_layers - 1})"
        )
    return covered


def silent_layer(like: TranscoderLayer, activation: str) -> TranscoderLayer:
    """A transcoder shaped as `like` whose latents never fire and that writes nothing: zero
    encoder and bias (every pre-activation is 0), a threshold of 1 for JumpReLU (0 > 1 never
    holds), zero decoder, output bias and skip. The padding of a model layer that a set does not
    cover: circuit-tracer's replacement model then leaves that layer's whole MLP output to the
    layer's error node. (ReLU(0) = 0; circuit-tracer's TopK keeps k zeros, which are inactive.)"""
    return TranscoderLayer(
        W_enc=torch.zeros_like(like.W_enc),
        b_enc=torch.zeros_like(like.b_enc),
        W_dec=torch.zeros_like(like.W_dec),
        b_dec=torch.zeros_like(like.b_dec),
        threshold=(
            torch.ones(like.b_enc.shape, dtype=torch.float32) if activation == "jumprelu" else None
        ),
        W_skip=None if like.W_skip is None else torch.zeros_like(like.W_skip),
    )


# -- dtypes --------------------------------------------------------------------------------------

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def threshold_in_dtype(threshold: Tensor, dtype: torch.dtype) -> Tensor:
    """θ cast to `dtype` rounding down, so that `pre > θ'` for pre-activations in `dtype` holds
    exactly when `pre > θ` (saetrain keeps θ in fp32 and compares in fp32; circuit-tracer compares
    in its own dtype, with the same strict `>`). Rounding to nearest could move θ below a pre that
    saetrain does not fire on."""
    cast = threshold.to(dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= torch.finfo(threshold.dtype).bits:
        return cast
    too_high = cast.to(threshold.dtype) > threshold
    if not bool(too_high.any()):
        return cast
    int_dtype = _INT_OF_SIZE[torch.finfo(dtype).bits // 8]
    bits = cast.view(int_dtype)
    # one step towards −inf: magnitude down for positives, up for negatives, 0 → −(smallest)
    smallest_negative = torch.full_like(bits, torch.iinfo(int_dtype).min + 1)
    stepped = torch.where(cast > 0, bits - 1, torch.where(cast < 0, bits + 1, smallest_negative))
    return torch.where(too_high, stepped.view(dtype), cast)


def _tensor(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach().to("cpu")
    return (t if dtype is None else t.to(dtype)).contiguous()


# -- writing -------------------------------------------------------------------------------------


def write_transcoder_set(
    folder: str | Path,
    layers: Mapping[int, TranscoderLayer] | Sequence[TranscoderLayer],
    *,
    feature_input_hook: str,
    feature_output_hook: str,
    activation: Activation,
    k: int | None = None,
    n_model_layers: int | None = None,
    dtype: torch.dtype | None = None,
    scan: str | None = None,
    transcoder_uri_prefix: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write a transcoder set (one per-layer transcoder per layer 0..m−1) for circuit-tracer.

    `layers` maps layer → TranscoderLayer (a sequence means layers 0..m−1), in SAELens
    orientation; `W_enc` is transposed here. Hooks: see `circuit_tracer_hooks` /
    `hooks_for_layers`. `activation`: "relu", "jumprelu" (every layer has a threshold; BatchTopK
    and Matryoshka are this) or "topk" (with `k`; see TOPK_COMPATIBILITY). `n_model_layers`: the
    model's layer count; a set that covers fewer (any of its layers, gaps allowed) is padded to
    it with `silent_layer`s and a warning (`coverage_warning`). Without it the layers must be
    0..m−1 and are written as they are. `dtype`: the files' dtype (default:
    the tensors'); a threshold is rounded down into it (`threshold_in_dtype`). `scan`: circuit-
    tracer's feature-visualisation id. `transcoder_uri_prefix` (e.g. "hf://user/repo/sub"):
    writes `transcoders: [prefix/layer_i.safetensors, ...]` for a hub upload; without it no list
    is written, since 0.5.0 reads a list entry that is not an hf:// URI as a path relative to the
    working directory, while without a list it finds the layer files itself (hub or local).
    `metadata` goes into config.yaml's `saetrain` block.
    """
    _check_hooks(feature_input_hook, feature_output_hook)
    _check_activation(activation, k)
    by_layer = dict(enumerate(layers)) if isinstance(layers, Sequence) else dict(layers)
    trained = _covered(by_layer, n_model_layers, "transcoder set")
    first = by_layer[trained[0]]
    d, n = first.W_enc.shape
    skip = first.W_skip is not None
    for i in trained:
        _check_layer(i, by_layer[i], d, n, activation, skip)
    indices = list(range(n_model_layers)) if n_model_layers is not None else trained
    padded = [i for i in indices if i not in by_layer]
    silent = silent_layer(first, activation)
    file_dtype = dtype or first.W_enc.dtype
    padded_bytes = (
        len(padded)
        * sum(t.numel() for t in vars(silent).values() if t is not None)
        * file_dtype.itemsize
    )
    warnings = _warnings(trained, n_model_layers, activation, padded_bytes)
    folder = _start(folder)
    files = []
    for i in indices:
        layer = by_layer.get(i, silent)
        w_dtype = dtype or layer.W_enc.dtype
        tensors = {
            "W_enc": _tensor(layer.W_enc.T, dtype),
            "W_dec": _tensor(layer.W_dec, dtype),
            "b_enc": _tensor(layer.b_enc, dtype),
            "b_dec": _tensor(layer.b_dec, dtype),
        }
        if layer.threshold is not None:
            tensors[THRESHOLD_KEY] = threshold_in_dtype(layer.threshold.detach().cpu(), w_dtype)
        if layer.W_skip is not None:
            tensors["W_skip"] = _tensor(layer.W_skip, dtype)
        name = f"layer_{i}.safetensors"
        atomic_write_bytes(folder / name, safetensors_bytes(tensors))
        files.append(name)
    config: dict[str, Any] = {
        "model_kind": TRANSCODER_SET,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
    }
    if activation == "topk":
        config["activation"] = "topk"
        config["k"] = int(k)  # type: ignore[arg-type]
    if scan is not None:
        config["scan"] = scan
    if transcoder_uri_prefix is not None:
        prefix = transcoder_uri_prefix.rstrip("/")
        config["transcoders"] = [f"{prefix}/{name}" for name in files]
    config["saetrain"] = _saetrain_block(
        activation, k, len(indices), n_model_layers, d, n, skip, warnings, metadata, padded
    )
    return _finish(folder, files, config, warnings)


def write_clt(
    folder: str | Path,
    clt: CLTTensors,
    *,
    feature_input_hook: str,
    feature_output_hook: str,
    layers: Sequence[int] | None = None,
    n_model_layers: int | None = None,
    dtype: torch.dtype | None = None,
    scan: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write a cross-layer transcoder for circuit-tracer (ReLU, or JumpReLU when `clt.threshold`
    is given). Arguments as `write_transcoder_set`; a CLT has no TopK and no skip connection in
    circuit-tracer's files. `layers`: the model layer of each of the CLT's layers, increasing
    (default 0..L−1). With `n_model_layers`, a CLT covering fewer of the model's layers is padded
    to all of them: a missing layer's latents never fire (zero W_enc and b_enc, θ = 1) and every
    decoder slot to or from it is zero, as is its output bias (`coverage_warning`)."""
    _check_hooks(feature_input_hook, feature_output_hook)
    L = clt.n_layers
    if L == 0:
        raise CircuitTracerExportError("a CLT needs at least one layer")
    lists = {"W_enc": clt.W_enc, "b_enc": clt.b_enc, "W_dec": clt.W_dec, "b_dec": clt.b_dec}
    if clt.threshold is not None:
        lists["threshold"] = clt.threshold
    for name, values in lists.items():
        if len(values) != L:
            raise CircuitTracerExportError(f"CLT: {name} has {len(values)} layers, W_enc has {L}")
    d, n = clt.W_enc[0].shape
    for i in range(L):
        _shape(f"W_enc[{i}]", clt.W_enc[i], (d, n))
        _shape(f"b_enc[{i}]", clt.b_enc[i], (n,))
        _shape(f"W_dec[{i}]", clt.W_dec[i], (n, L - i, d))
        _shape(f"b_dec[{i}]", clt.b_dec[i], (d,))
        if clt.threshold is not None:
            _shape(f"threshold[{i}]", clt.threshold[i], (n,))
    model_layers = list(range(L)) if layers is None else [int(i) for i in layers]
    if len(model_layers) != L or model_layers != sorted(set(model_layers)):
        raise CircuitTracerExportError(
            f"layers={model_layers}: a CLT of {L} layers needs {L} increasing model layers"
        )
    _covered(model_layers, n_model_layers, "CLT")
    M = n_model_layers if n_model_layers is not None else L
    at = {layer: a for a, layer in enumerate(model_layers)}  # model layer → CLT layer
    activation: Activation = "jumprelu" if clt.threshold is not None else "relu"
    file_dtype = dtype or clt.W_enc[0].dtype
    written = sum((M - m) * n * d for m in range(M)) + M * (n * d + 2 * n + d)
    own = sum((L - a) * n * d for a in range(L)) + L * (n * d + 2 * n + d)
    warnings = _warnings(model_layers, n_model_layers, activation,
                         (written - own) * file_dtype.itemsize)  # fmt: skip
    folder = _start(folder)
    files = []
    for m in range(M):
        a = at.get(m)
        if a is None:  # a layer the CLT does not cover: latents that never fire
            W_enc, b_enc = clt.W_enc[0].new_zeros(d, n), clt.b_enc[0].new_zeros(n)
            b_dec = clt.b_dec[0].new_zeros(d)
            theta = None if clt.threshold is None else torch.ones(n)
        else:
            W_enc, b_enc, b_dec = clt.W_enc[a], clt.b_enc[a], clt.b_dec[a]
            theta = None if clt.threshold is None else clt.threshold[a].detach().cpu()
        W_dec = _padded_decoder(clt, m, a, model_layers, M) if M != L else clt.W_dec[m]
        w_dtype = dtype or W_enc.dtype
        enc = {
            f"W_enc_{m}": _tensor(W_enc.T, dtype),
            f"b_enc_{m}": _tensor(b_enc, dtype),
            f"b_dec_{m}": _tensor(b_dec, dtype),
        }
        if theta is not None:
            enc[f"threshold_{m}"] = threshold_in_dtype(theta, w_dtype)
        atomic_write_bytes(folder / f"W_enc_{m}.safetensors", safetensors_bytes(enc))
        dec = {f"W_dec_{m}": _tensor(W_dec, dtype)}
        atomic_write_bytes(folder / f"W_dec_{m}.safetensors", safetensors_bytes(dec))
        files += [f"W_enc_{m}.safetensors", f"W_dec_{m}.safetensors"]
    config: dict[str, Any] = {
        "model_kind": CLT,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
    }
    if scan is not None:
        config["scan"] = scan
    padded = [m for m in range(M) if m not in at]
    config["saetrain"] = _saetrain_block(
        activation, None, M, n_model_layers, d, n, False, warnings, metadata, padded
    )
    return _finish(folder, files, config, warnings)


def _padded_decoder(
    clt: CLTTensors, m: int, a: int | None, model_layers: list[int], M: int
) -> Tensor:
    """Model layer m's decoder [n, M − m, d] in a CLT padded to M layers (slot j writes layer
    m + j): the CLT's layer a, when it sits at m, writes to its layer b ≥ a at slot
    model_layers[b] − m; every other slot is zero (all of them where m is not covered)."""
    n, _, d = clt.W_dec[0].shape
    out = clt.W_dec[0].new_zeros(n, M - m, d)
    if a is not None:
        for j in range(clt.n_layers - a):
            out[:, model_layers[a + j] - m] = clt.W_dec[a][:, j]
    return out


# The hook names circuit-tracer 0.5.0 knows (its nnsight mappings, utils/tl_nnsight_mapping.py;
# the TransformerLens backend resolves any attribute path under a block).
_KNOWN_INPUT_HOOKS = ("hook_resid_mid", "mlp.hook_in", "ln2.hook_normalized")
_KNOWN_OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")


def _check_hooks(feature_input_hook: str, feature_output_hook: str) -> None:
    """Refuse full TransformerLens names (circuit-tracer prepends `blocks.{l}.` itself) and names
    its replacement model does not know."""
    for hook, known in (
        (feature_input_hook, _KNOWN_INPUT_HOOKS),
        (feature_output_hook, _KNOWN_OUTPUT_HOOKS),
    ):
        if hook not in known:
            raise CircuitTracerExportError(
                f"hook {hook!r}: circuit-tracer takes one of {', '.join(known)} here, relative to "
                "blocks.{l} (circuit_tracer_hooks turns saetrain sites into these names)"
            )


def _check_activation(activation: str, k: int | None) -> None:
    if activation not in ACTIVATIONS:
        raise CircuitTracerExportError(
            f"activation={activation!r}; circuit-tracer reads one of: {', '.join(ACTIVATIONS)}"
        )
    if activation == "topk" and (k is None or int(k) < 1):
        raise CircuitTracerExportError("activation='topk' needs k >= 1 (written as `k`)")
    if activation != "topk" and k is not None:
        raise CircuitTracerExportError(f"k={k} is only written for activation='topk'")


def _check_layer(
    i: int, layer: TranscoderLayer, d: int, n: int, activation: str, skip: bool
) -> None:
    """Every layer alike: circuit-tracer's SingleLayerTranscoder has one d_model for input and
    output (W_skip [d, d]), TranscoderSet asserts one width, and skip is read from layer 0."""
    _shape(f"layer {i}: W_enc", layer.W_enc, (d, n))
    _shape(f"layer {i}: b_enc", layer.b_enc, (n,))
    _shape(f"layer {i}: W_dec", layer.W_dec, (n, d))
    _shape(f"layer {i}: b_dec", layer.b_dec, (d,))
    if (layer.threshold is not None) != (activation == "jumprelu"):
        raise CircuitTracerExportError(
            f"layer {i}: activation={activation!r} "
            + ("needs a threshold" if activation == "jumprelu" else "takes no threshold")
        )
    if layer.threshold is not None:
        _shape(f"layer {i}: threshold", layer.threshold, (n,))
    if (layer.W_skip is not None) != skip:
        raise CircuitTracerExportError(
            f"layer {i}: W_skip must be on every layer or none (circuit-tracer reads it from "
            "layer 0 for the whole set)"
        )
    if layer.W_skip is not None:
        _shape(f"layer {i}: W_skip", layer.W_skip, (d, d))


def _shape(name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise CircuitTracerExportError(
            f"{name} has shape {tuple(t.shape)}, expected {expected} (circuit-tracer's "
            "transcoders read and write one width d_model, with the same n features per layer)"
        )


def _warnings(
    layers: Iterable[int], n_model_layers: int | None, activation: str, padded_bytes: int = 0
) -> list[str]:
    warnings = []
    coverage = coverage_warning(layers, n_model_layers, padded_bytes)
    if coverage:
        warnings.append(coverage)
    if activation == "topk":
        warnings.append(TOPK_COMPATIBILITY)
    return warnings


def _saetrain_block(
    activation: str,
    k: int | None,
    n_layers: int,
    n_model_layers: int | None,
    d: int,
    n: int,
    skip: bool,
    warnings: list[str],
    metadata: Mapping[str, Any] | None,
    padded: Sequence[int] = (),
) -> dict[str, Any]:
    """What saetrain records for readers (circuit-tracer ignores this key). `padded_layers`: the
    layers written as latents that never fire (the model's layers the export did not cover)."""
    block: dict[str, Any] = {
        "activation": activation,
        "layers": n_layers,
        "padded_layers": [int(i) for i in padded],
        "model_layers": n_model_layers,
        "d_model": int(d),
        "d_transcoder": int(n),
        "skip_connection": skip,
        "folded": True,
    }
    if k is not None:
        block["k"] = int(k)
    if warnings:
        block["warnings"] = list(warnings)
    if metadata:
        block["metadata"] = dict(metadata)
    return block


def _start(folder: str | Path) -> Path:
    """Make the folder; drop an old config.yaml first so a half-rewritten folder never looks
    complete to circuit-tracer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    return folder


_OWN_FILE = re.compile(r"^(layer_|W_enc_|W_dec_)\d+\.safetensors$")


def _finish(
    folder: Path,
    files: list[str],
    config: dict[str, Any],
    warnings: list[str],
) -> ExportResult:
    """Remove the format's files that this export did not write (an earlier, larger or other-kind
    export's: circuit-tracer globs them), then write config.yaml last and log the warnings."""
    keep = set(files)
    for path in folder.iterdir():
        if _OWN_FILE.match(path.name) and path.name not in keep:
            path.unlink()
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    atomic_write_bytes(folder / CONFIG_FILE, text.encode())
    for message in warnings:
        logger.warning("circuit-tracer export %s: %s", folder, message)
    return ExportResult(folder, [*files, CONFIG_FILE], config, warnings)


# -- from a saetrain dictionary ------------------------------------------------------------------


def layer_from_dictionary(dictionary: Any) -> tuple[TranscoderLayer, Activation, int | None]:
    """(layer, activation, k) for a trained, folded saetrain transcoder: its SAELens tensors, with
    BatchTopK / Matryoshka as the JumpReLU they compute at inference. An SAE's input centring
    (x − b_dec) is moved into b_enc, since circuit-tracer encodes x·W_encᵀ + b_enc. Gated has no
    circuit-tracer counterpart and is refused."""
    arch = dictionary.saelens_architecture()
    if arch.startswith("gated"):
        raise CircuitTracerExportError(
            "circuit-tracer has no Gated transcoder (it builds ReLU, JumpReLU and, on its main "
            "branch, TopK ones)"
        )
    t = dictionary.saelens_tensors()
    b_enc = t["b_enc"]
    if dictionary.apply_b_dec_to_input:
        b_enc = b_enc - t["b_dec"].to(t["W_enc"].dtype) @ t["W_enc"]
    layer = TranscoderLayer(
        W_enc=t["W_enc"],
        b_enc=b_enc,
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        threshold=t.get("threshold"),
        W_skip=t.get("W_skip"),
    )
    if arch.startswith("jumprelu"):
        # the fp32 θ itself, not the SAELens copy cast to the weights' dtype
        theta = getattr(dictionary, "threshold", None)
        if isinstance(theta, Tensor):
            theta = theta.detach().float().expand(dictionary.n_latents).clone()
            layer = replace(layer, threshold=theta)
        return layer, "jumprelu", None
    if arch.startswith("topk"):
        return layer, "topk", int(dictionary.k)
    return layer, "relu", None


def clt_from_dictionary(dictionary: Any) -> CLTTensors:
    """The CLTTensors of a trained, folded saetrain CLT (saetrain/dictionaries/clt.py): per layer
    W_enc [d, n], b_enc, the decoder row block [n, L − i, d] and θ (JumpReLU, and BatchTopK's
    per-layer threshold as the JumpReLU it is at inference; fp32). TopK has no
    circuit-tracer CLT and is refused, as is a skip connection (circuit-tracer reads none)."""
    if not dictionary.elementwise_inference:
        raise CircuitTracerExportError(
            "circuit-tracer 0.5.0 builds ReLU and JumpReLU CLTs only; a TopK CLT is not exported "
            "for it (train dictionary.architecture=jumprelu for circuit-tracer)"
        )
    if dictionary.W_skip is not None:
        raise CircuitTracerExportError("circuit-tracer reads no skip connection of a CLT")
    L, d_out, n = dictionary.n_layers, dictionary.layer_d_out, dictionary.layer_latents
    thresholds = dictionary.inference_thresholds()  # BatchTopK: a JumpReLU, θ per layer
    theta = None
    if thresholds is not None:
        theta = [t.detach().float().clone() for t in thresholds.reshape(L, n)]
    return CLTTensors(
        W_enc=[w.detach() for w in dictionary.W_enc],
        b_enc=[b.detach() for b in dictionary.b_enc.reshape(L, n)],
        W_dec=[w.detach().reshape(n, L - i, d_out) for i, w in enumerate(dictionary.W_dec)],
        b_dec=[b.detach() for b in dictionary.b_dec.reshape(L, d_out)],
        threshold=theta,
    )


# -- reading -------------------------------------------------------------------------------------


def _read_config(folder: Path, kind: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {folder} a circuit-tracer export?")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or config.get("model_kind") != kind:
        found = config.get("model_kind") if isinstance(config, dict) else None
        raise CircuitTracerExportError(f"{path}: model_kind is {found!r}, expected {kind!r}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str):
            raise CircuitTracerExportError(f"{path} lacks {key}")
    return config


def _numbered(folder: Path, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.safetensors$")
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name)))
    return _check_contiguous(found, f"folder ({folder}, {prefix}*.safetensors)")


def _only(tensors: dict[str, Tensor], allowed: set[str], path: Path) -> None:
    extra = set(tensors) - allowed
    if extra:
        raise CircuitTracerExportError(
            f"{path} holds {sorted(extra)}: circuit-tracer refuses tensors it does not know"
        )


def read_transcoder_set(folder: str | Path) -> TranscoderSetFiles:
    """Read a transcoder-set folder back into SAELens orientation (W_enc [d, n])."""
    folder = Path(folder)
    config = _read_config(folder, TRANSCODER_SET)
    layers = {}
    for i in _numbered(folder, "layer_"):
        path = folder / f"layer_{i}.safetensors"
        t = load_file(path)
        _only(t, {"W_enc", "W_dec", "b_enc", "b_dec", THRESHOLD_KEY, "W_skip"}, path)
        layers[i] = TranscoderLayer(
            W_enc=t["W_enc"].T.contiguous(),
            b_enc=t["b_enc"],
            W_dec=t["W_dec"],
            b_dec=t["b_dec"],
            threshold=t.get(THRESHOLD_KEY),
            W_skip=t.get("W_skip"),
        )
    return TranscoderSetFiles(config, layers)


def read_clt(folder: str | Path) -> CLTFiles:
    """Read a CLT folder back into SAELens orientation (W_enc[i] [d, n])."""
    folder = Path(folder)
    config = _read_config(folder, CLT)
    indices = _numbered(folder, "W_enc_")
    W_enc, b_enc, b_dec, W_dec, threshold = [], [], [], [], []
    for i in indices:
        path = folder / f"W_enc_{i}.safetensors"
        t = load_file(path)
        _only(t, {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}, path)
        W_enc.append(t[f"W_enc_{i}"].T.contiguous())
        b_enc.append(t[f"b_enc_{i}"])
        b_dec.append(t[f"b_dec_{i}"])
        if f"threshold_{i}" in t:
            threshold.append(t[f"threshold_{i}"])
        dec_path = folder / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise FileNotFoundError(f"{dec_path} does not exist (W_enc_{i} has no decoder)")
        dec = load_file(dec_path)
        _only(dec, {f"W_dec_{i}"}, dec_path)
        W_dec.append(dec[f"W_dec_{i}"])
    if threshold and len(threshold) != len(indices):
        raise CircuitTracerExportError(f"{folder}: some layers have a threshold, some not")
    return CLTFiles(config, CLTTensors(W_enc, b_enc, W_dec, b_dec, threshold or None))


__all__ = [
    "ACTIVATIONS",
    "CLT",
    "CONFIG_FILE",
    "TOPK_COMPATIBILITY",
    "TRANSCODER_SET",
    "CLTFiles",
    "CLTTensors",
    "CircuitTracerExportError",
    "ExportResult",
    "TranscoderLayer",
    "TranscoderSetFiles",
    "circuit_tracer_hooks",
    "coverage_warning",
    "hooks_for_layers",
    "layer_from_dictionary",
    "read_clt",
    "read_transcoder_set",
    "silent_layer",
    "threshold_in_dtype",
    "write_clt",
    "write_transcoder_set",
]
