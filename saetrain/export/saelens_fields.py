"""Every cfg.json field of a SAELens folder that changes the math: honoured, or refused by name.

SAELens writes two formats into the same layout: the inference format (`SAE.save_model`,
`TrainingSAE.save_inference_model`) and the training format (`TrainingSAE.save_model`), whose
cfg.json holds the training architecture and its settings. Pre-6.0 folders name the activation
(`activation_fn_str` / `activation_fn` with `activation_fn_kwargs`) instead of an architecture.
This module rewrites a folder's cfg and tensors into the form saetrain's architecture classes load
(dictionaries/*.py, `from_saelens`), so that saetrain computes what SAELens's own loader computes:

honoured
- `rescale_acts_by_decoder_norm` (topk, batchtopk, matryoshka_batchtopk): SAELens scales the
  pre-activations by ‖W_dec,i‖ before the top-k and divides the codes by it before decoding;
  folded exactly as SAELens's own inference export does (W_enc·n, b_enc·n, W_dec/n).
- `apply_b_dec_to_input: false` on an SAE (Gemma Scope): the encoder does not subtract b_dec;
  folded into the encoder bias (b_enc + b_dec·W_enc), the dictionary stays an SAE.
- `batchtopk`, `matryoshka_batchtopk` (training format): their inference form, as SAELens's
  `save_inference_model` writes it: a JumpReLU with `topk_threshold` for every latent.
- a JumpReLU `log_threshold` tensor (older training format): threshold = exp(log_threshold).
- `k` (or pre-6.0 `activation_fn_kwargs.k`), `d_out`, `reshape_activations` ("hook_z": the
  flattened heads saetrain's attn_z reads), `normalize_activations: "none"`.

refused by name
- `normalize_activations`: "expected_average_only_in" (the weights expect activations scaled by
  a factor the folder does not hold), "constant_norm_rescale" and "layer_norm" (a per-row
  normalisation undone after decoding: not a linear map saetrain's dictionaries compute).
- `hook_head_index` / `hook_head_index_out` (metadata) other than null: one head of hook_z.
- `finetuning_scaling_factor: true` (pre-6.0 per-latent code scale).
- architectures abstopk, temporal, matching_pursuit; a pre-6.0 activation other than relu/topk.

Training settings (`l1_coefficient`, `jumprelu_bandwidth`, `matryoshka_widths`, …), `dtype`,
`device` and provenance do not change what the saved dictionary computes: inert. Any other field
is a warning naming it (export/fields.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saetrain.export.fields import check_fields, refuse

# SAELens's inference-config fields (all architectures) and the training-config fields that only
# steer training; the legacy (pre-6.0) top-level metadata; and what saetrain's own export adds.
_INFERENCE = (
    "architecture", "d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input",
    "normalize_activations", "reshape_activations", "metadata", "k",
    "rescale_acts_by_decoder_norm",
)  # fmt: skip
_TRAINING = (
    "decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps",
    "use_sparse_activations", "aux_loss_coefficient", "topk_threshold_lr", "matryoshka_widths",
    "use_matryoshka_aux_loss", "jumprelu_init_threshold", "jumprelu_bandwidth",
    "jumprelu_sparsity_loss_mode", "l0_coefficient", "l0_warm_up_steps",
    "pre_act_loss_coefficient", "jumprelu_tanh_scale", "jumprelu_ste_to_input", "target_l0",
)  # fmt: skip
_LEGACY = (
    "activation_fn_str", "activation_fn", "activation_fn_kwargs", "finetuning_scaling_factor",
    "model_name", "hook_name", "hook_point", "hook_layer", "hook_head_index",
    "hook_point_head_index", "hook_name_out", "hook_layer_out", "hook_head_index_out",
    "model_class_name", "model_from_pretrained_kwargs", "prepend_bos", "context_size",
    "dataset_path", "dataset_trust_remote_code", "exclude_special_tokens", "seqpos_slice",
    "neuronpedia_id", "sae_lens_version", "sae_lens_training_version", "hf_hook_name",
    "hf_hook_name_out",
)  # fmt: skip
_SAETRAIN = (
    "clt_architecture", "n_layers", "d_in_per_layer", "d_out_per_layer", "d_sae_per_layer",
    "crosscoder_architecture", "n_sources", "d_source",
)  # fmt: skip
KNOWN_FIELDS = frozenset(_INFERENCE + _TRAINING + _LEGACY + _SAETRAIN)

# The architectures whose pre-activations SAELens rescales by the decoder norms when asked.
_RESCALED = ("topk", "batchtopk", "matryoshka_batchtopk", "topk_skip_transcoder")
# Training-format architectures saved by SAELens as the JumpReLU they are at inference.
_THRESHOLD_TRAINED = ("batchtopk", "matryoshka_batchtopk")
# SAELens's transcoder architectures (their b_dec lives in the output space).
_TRANSCODERS = (
    "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
    "gated_skip_transcoder", "topk_skip_transcoder",
)  # fmt: skip
_NORMALISATIONS = {
    "expected_average_only_in": "the weights expect activations multiplied by a scaling factor "
    "that the folder does not hold (SAELens folds it in at the end of training: export from the "
    "trained SAE with save_inference_model)",
    "constant_norm_rescale": "each row is rescaled to norm sqrt(d_in) before encoding and back "
    "after decoding, which is not a linear map saetrain's dictionaries compute",
    "layer_norm": "each row is layer-normalised before encoding and de-normalised after "
    "decoding, which is not a linear map saetrain's dictionaries compute",
}


def _legacy_architecture(cfg: dict[str, Any], path: Path) -> str:
    """A pre-6.0 config's architecture, from its activation function."""
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if fn not in ("relu", "topk"):
        raise refuse(path, "activation_fn_str", fn, "saetrain reads relu and topk")
    return "topk" if fn == "topk" else "standard"


def _k(cfg: dict[str, Any], path: Path) -> int | None:
    kwargs_k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if "k" in cfg and kwargs_k is not None and int(kwargs_k) != int(cfg["k"]):
        raise refuse(path, "activation_fn_kwargs.k", kwargs_k, f"k={cfg['k']} disagrees")
    k = cfg.get("k", kwargs_k)
    return None if k is None else int(k)


def fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens's `rescale_acts_by_decoder_norm` made explicit: codes z·n from pre-activations
    scaled by n = ‖W_dec,i‖, decoded by W_dec/n. The same codes and reconstruction, in double
    precision and cast back."""
    out = dict(tensors)
    W_dec = tensors["W_dec"].double()
    norms = W_dec.norm(dim=-1)
    out["W_enc"] = (tensors["W_enc"].double() * norms).to(tensors["W_enc"].dtype)
    out["b_enc"] = (tensors["b_enc"].double() * norms).to(tensors["b_enc"].dtype)
    out["W_dec"] = (W_dec / norms[:, None]).to(tensors["W_dec"].dtype)
    return out


def honour_saelens_fields(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(cfg, tensors, fold_b_dec): the folder rewritten for saetrain's loaders; `fold_b_dec` asks
    the caller to fold an SAE's un-applied b_dec into its encoder bias (absorb_input_shift)."""
    cfg, tensors = dict(cfg), dict(tensors)
    legacy_version = not cfg.get("architecture")
    if legacy_version:
        cfg["architecture"] = _legacy_architecture(cfg, path)
    arch = cfg["architecture"]
    check_fields(
        cfg,
        path,
        KNOWN_FIELDS,
        {"reshape_activations": ("none", "hook_z"), "finetuning_scaling_factor": (False, None)},
    )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        why = _NORMALISATIONS.get(norm, "saetrain reads only 'none'")
        raise refuse(path, "normalize_activations", norm, why)
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    for field in ("hook_head_index", "hook_point_head_index", "hook_head_index_out"):
        if metadata.get(field) is not None:
            raise refuse(
                path, field, metadata[field], "an SAE on one attention head's slice of hook_z; "
                "saetrain's attn_z site reads all heads"
            )  # fmt: skip
    k = _k(cfg, path)
    if k is not None:
        cfg["k"] = k
    if cfg.get("rescale_acts_by_decoder_norm") and arch in _RESCALED:
        tensors = fold_decoder_norm(tensors)
    if arch in _THRESHOLD_TRAINED:
        threshold = tensors.pop("topk_threshold")
        tensors["threshold"] = threshold.to(tensors["b_enc"].dtype).expand_as(tensors["b_enc"])
        cfg["architecture"] = arch = "jumprelu"
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    fold_b_dec = False
    if not cfg.get("apply_b_dec_to_input", True) and not _is_transcoder(cfg, metadata, tensors):
        cfg["apply_b_dec_to_input"] = True  # an SAE that reads x itself: folded by the caller
        fold_b_dec = True
    return cfg, tensors, fold_b_dec


def _is_transcoder(
    cfg: dict[str, Any], metadata: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> bool:
    """A transcoder by SAELens's architecture name, a `d_out` field (SAELens's transcoder configs
    and saetrain's transcoders write one, SAEs never do), its output hook, saetrain's target
    site, a skip connection or a differing output width."""
    W_enc, W_dec = tensors.get("W_enc"), tensors.get("W_dec")
    widths_differ = W_enc is not None and W_dec is not None and W_enc.shape[0] != W_dec.shape[-1]
    return (
        cfg["architecture"] in _TRANSCODERS
        or "d_out" in cfg
        or bool(metadata.get("hook_name_out") or metadata.get("saetrain_target_site"))
        or bool(metadata.get("saetrain_target_sites"))
        or "W_skip" in tensors
        or widths_differ
        or cfg["architecture"] in ("crosscoder", "clt")
    )
