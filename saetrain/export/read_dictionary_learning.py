"""Read a dictionary_learning (saprmarks, `dictionary-learning` on PyPI) folder: config.json and
ae.pt.

config.json's `trainer.dict_class` names the class whose state dict ae.pt holds; each maps onto a
saetrain architecture, as that class's default `encode` computes (the tensors are renamed into
the SAELens layout and loaded by the architecture's own class):
- AutoEncoder: z = ReLU((x − bias)·encoderᵀ + b), ŷ = z·decoderᵀ + bias → relu ("standard");
- GatedAutoEncoder (encode without `normalize_decoder`) → gated;
- AutoEncoderTopK (encode without `use_threshold`: the top k) → topk, k from its `k` buffer;
- BatchTopKSAE and MatryoshkaBatchTopKSAE (encode with `use_threshold`, their default):
  z = ReLU(pre)·1[ReLU(pre) > θ] → a JumpReLU with θ for every latent (a θ < 0, never set,
  lets every positive pre-activation through);
- JumpReluAutoEncoder: its encoder reads x itself (`apply_b_dec_to_input` False, not saved),
  folded into the encoder bias so that the dictionary stays an SAE.
Other classes are refused by name. `norm_factor` (trainer setting `normalize_activations`) is
already folded into the saved weights by dictionary_learning (`scale_biases` before saving ae.pt):
inert. `trainer.lm_name` and `buffer.ctx_len` give the model and context where they are set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saetrain.dictionaries import SAELENS_LOADERS, Dictionary
from saetrain.export.fields import refuse, warn_unknown
from saetrain.export.formats import FORMAT_FILES

CFG_FILE, WEIGHTS_FILE = FORMAT_FILES["dictionary_learning"]


def _linear(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """An nn.Linear's weight [out, in] as SAELens's [in, out]."""
    return state[f"{prefix}.weight"].T.contiguous()


def _linear_sae(state: dict[str, torch.Tensor], b_dec: str) -> dict[str, torch.Tensor]:
    """An encoder and a decoder nn.Linear and the decoder bias `b_dec`, in the SAELens layout."""
    return {
        "W_enc": _linear(state, "encoder"),
        "b_enc": state["encoder.bias"],
        "W_dec": _linear(state, "decoder"),
        "b_dec": state[b_dec],
    }


def _standard(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    return "standard", _linear_sae(state, "bias")


def _gated(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    return "gated", {
        "W_enc": _linear(state, "encoder"),
        "b_gate": state["gate_bias"],
        "b_mag": state["mag_bias"],
        "r_mag": state["r_mag"],
        "W_dec": _linear(state, "decoder"),
        "b_dec": state["decoder_bias"],
    }


def _topk(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    return "topk", _linear_sae(state, "b_dec")


def _thresholded(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """BatchTopK (nn.Linear layers) and Matryoshka (W_enc/W_dec parameters) at inference."""
    if "W_enc" in state:
        tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    else:
        tensors = _linear_sae(state, "b_dec")
    theta = state["threshold"].float().clamp_min(0.0)  # −1: never estimated, ReLU alone
    tensors["threshold"] = theta.expand(tensors["b_enc"].shape[0]).to(tensors["b_enc"].dtype)
    return "jumprelu", tensors


def _jumprelu(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    return "jumprelu", {
        name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    }


# trainer.dict_class → (tensors in the SAELens layout, the encoder subtracts b_dec).
_CLASSES = {
    "AutoEncoder": (_standard, True),
    "GatedAutoEncoder": (_gated, True),
    "AutoEncoderTopK": (_topk, True),
    "BatchTopKSAE": (_thresholded, True),
    "MatryoshkaBatchTopKSAE": (_thresholded, True),
    "JumpReluAutoEncoder": (_jumprelu, False),
}


def read_dictionary_learning(folder: Path) -> Dictionary:
    """The dictionary of a dictionary_learning folder, on raw activations."""
    cfg_path = folder / CFG_FILE
    trainer: dict[str, Any] = json.loads(cfg_path.read_text()).get("trainer", {})
    dict_class = trainer.get("dict_class")
    if dict_class not in _CLASSES:
        raise refuse(
            cfg_path, "trainer.dict_class", dict_class, f"saetrain reads {', '.join(_CLASSES)}"
        )
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    convert, subtracts_b_dec = _CLASSES[dict_class]
    try:
        arch, tensors = convert(state)
    except KeyError as e:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} lacks the tensor {e} of a {dict_class}"
        ) from None
    # Buffers that the default encode does not use (a TopK's threshold) or that are read above.
    used = {"k", "threshold", "group_sizes", "encoder.weight", "encoder.bias", "decoder.weight"}
    used |= {"bias", "b_dec", "decoder_bias", "gate_bias", "mag_bias", "r_mag"} | set(tensors)
    warn_unknown(folder / WEIGHTS_FILE, "tensors", set(state) - used)
    cfg: dict[str, Any] = {"apply_b_dec_to_input": True}
    if arch == "topk":
        cfg["k"] = int(state["k"]) if "k" in state else int(trainer["k"])
    dictionary = SAELENS_LOADERS[arch].from_saelens(cfg, tensors)
    if not subtracts_b_dec:  # its encoder reads x: the same pre-activations from x − b_dec
        dictionary.absorb_input_shift(dictionary.b_dec.detach().clone())  # type: ignore[operator]
    return dictionary  # type: ignore[return-value]


def dictionary_learning_metadata(folder: Path) -> dict[str, Any]:
    """The model (`model_name`) and context size (`context_size`) the folder names, if any."""
    cfg = json.loads((folder / CFG_FILE).read_text())
    meta: dict[str, Any] = {}
    if cfg.get("trainer", {}).get("lm_name"):
        meta["model_name"] = cfg["trainer"]["lm_name"]
    if (cfg.get("buffer") or {}).get("ctx_len"):
        meta["context_size"] = int(cfg["buffer"]["ctx_len"])
    return meta
