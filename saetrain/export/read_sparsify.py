"""Read a sparsify (EleutherAI, `eai-sparsify`) hookpoint folder: cfg.json + sae.safetensors.

sparsify's SparseCoder computes z = TopK(ReLU((x − b_dec)·Wᵀ + b)) (no b_dec subtraction when
`transcode`), ŷ = z·W_dec + b_dec (+ x·W_skipᵀ with `skip_connection`), with `encoder.weight`
[n, d_in], `encoder.bias` [n], `W_dec` [n, d_in], `b_dec` [d_in], `W_skip` [d_in, d_in]. That is
saetrain's TopK SAE (a transcoder when `transcode`), so the reader renames the tensors into the
SAELens layout and lets the TopK class load them.

Fields: `activation` ("topk" honoured, "groupmax" refused), `k`, `transcode` and
`skip_connection` honoured; `d_in`, `num_latents`, `expansion_factor` checked against the
tensors; `normalize_decoder` and `multi_topk` are training settings (the saved decoder is used as
it is). The run folder's config.json (`model`, `ctx_len`) and the hookpoint folder's name give the
model and site where they can be told.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from saetrain.dictionaries import SAELENS_LOADERS, Dictionary
from saetrain.export.fields import check_fields, refuse, warn_unknown
from saetrain.export.formats import FORMAT_FILES

CFG_FILE, WEIGHTS_FILE = FORMAT_FILES["sparsify"]
RUN_CONFIG_FILE = "config.json"  # the run folder's TrainConfig, one level up

# Fields read (or checked) here; training settings that do not change the saved coder's math.
_KNOWN = ("d_in", "k", "transcode", "skip_connection", "num_latents", "expansion_factor")
_INERT = ("normalize_decoder", "multi_topk")
_ALLOWED = {"activation": ("topk",)}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

# sparsify hookpoints (module paths of a HF model) that name a saetrain site: a decoder layer's
# output is the residual stream after it, its `mlp` module reads the MLP input and writes the MLP
# output.
_LAYER = re.compile(r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)(\.mlp)?$")


def read_sparsify(folder: Path) -> Dictionary:
    """The dictionary of a sparsify hookpoint folder, on raw activations."""
    cfg_path = folder / CFG_FILE
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    check_fields(cfg, cfg_path, (*_KNOWN, *_INERT), _ALLOWED)
    raw = load_file(folder / WEIGHTS_FILE, device="cpu")
    for name in _TENSORS:
        if name not in raw:
            raise ValueError(f"{folder / WEIGHTS_FILE} lacks the tensor {name}")
    warn_unknown(folder / WEIGHTS_FILE, "tensors", set(raw) - {*_TENSORS, "W_skip"})
    n, d_in = raw["encoder.weight"].shape
    if int(cfg.get("d_in", d_in)) != d_in:
        raise refuse(cfg_path, "d_in", cfg["d_in"], f"the encoder reads {d_in} columns")
    if cfg.get("num_latents") and int(cfg["num_latents"]) != n:
        raise refuse(cfg_path, "num_latents", cfg["num_latents"], f"the encoder has {n} rows")
    skip = bool(cfg.get("skip_connection", False))
    if skip != ("W_skip" in raw):
        raise refuse(cfg_path, "skip_connection", skip, "the tensors say otherwise (W_skip)")
    tensors = {
        "W_enc": raw["encoder.weight"].T.contiguous(),
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    if skip:
        tensors["W_skip"] = raw["W_skip"]
    saelens_cfg = {"k": int(cfg.get("k", 32)), "apply_b_dec_to_input": not cfg.get("transcode")}
    return SAELENS_LOADERS["topk"].from_saelens(saelens_cfg, tensors)  # type: ignore[return-value]


def sparsify_metadata(folder: Path) -> dict[str, Any]:
    """What the folder says about where it was trained, under SAELens's metadata names
    (`model_name`, `context_size`) and saetrain's site names (`saetrain_site`,
    `saetrain_target_site`) where the hookpoint names one; {} entries where it does not."""
    meta: dict[str, Any] = {}
    run_cfg_path = folder.parent / RUN_CONFIG_FILE
    if run_cfg_path.is_file():
        run_cfg = json.loads(run_cfg_path.read_text())
        if run_cfg.get("model"):
            meta["model_name"] = run_cfg["model"]
        if run_cfg.get("ctx_len"):
            meta["context_size"] = int(run_cfg["ctx_len"])
    match = _LAYER.match(folder.name)
    if match:
        layer, mlp = match.group(1), match.group(2)
        transcode = bool(json.loads((folder / CFG_FILE).read_text()).get("transcode"))
        if not mlp:
            meta["saetrain_site"] = f"resid_post.{layer}"
        elif transcode:
            meta["saetrain_site"] = f"mlp_in.{layer}"
            meta["saetrain_target_site"] = f"mlp_out.{layer}"
        else:
            meta["saetrain_site"] = f"mlp_out.{layer}"
    return meta
