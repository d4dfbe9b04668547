"""SAELens loads a folder saetrain saved and computes what saetrain computes (codes, outputs).

Skipped where sae-lens is not installed (it is not a saetrain dependency; CI's interop job
installs it). An architecture SAELens has no class for (saetrain-only: TopK and Gated
transcoders) is skipped by name.
"""

from __future__ import annotations

import json

import pytest
import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import SparseCodes, build_dictionary
from saetrain.export.saelens import CFG_FILE, load_dictionary, save_dictionary

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.registry import SAE_CLASS_REGISTRY  # noqa: E402

D, N, ROWS = 24, 96, 64
META = {"model_name": "m", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3}


def _saved(tmp_path, architecture: str, transcoder: bool):
    cfg = DictionaryConfig(architecture=architecture, n_latents=N, k=5)
    g = torch.Generator().manual_seed(0)
    dictionary = build_dictionary(cfg, D, D, torch.device("cpu"), g, transcoder=transcoder)
    with torch.no_grad():  # away from the init, where some differences hide
        for p in dictionary.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    meta = META | ({"hook_name_out": "blocks.3.hook_mlp_out"} if transcoder else {})
    return save_dictionary(dictionary, tmp_path, meta)


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu", "gated", "jumprelu"])
def test_saelens_loads_the_folder_and_agrees(tmp_path, architecture, transcoder):
    folder = _saved(tmp_path, architecture, transcoder)
    ours = load_dictionary(folder)
    saved_as = json.loads((folder / CFG_FILE).read_text())["architecture"]
    if saved_as not in SAE_CLASS_REGISTRY:
        pytest.skip(f"SAELens has no class for {saved_as!r} (saetrain loads it)")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    scale = float(ours.b_dec.detach().norm() / ours.d_in**0.5) or 1.0
    x = torch.randn(ROWS, ours.d_in, generator=torch.Generator().manual_seed(0)) * scale
    x = x + ours.b_dec.detach()
    with torch.no_grad():
        out_ours, out_theirs = ours(x), theirs(x)
        if isinstance(out_theirs, tuple):  # SAELens transcoders return (output, codes)
            out_theirs = out_theirs[0]
        codes_ours = ours.encode(x)
        if isinstance(codes_ours, SparseCodes):
            codes_ours = codes_ours.to_dense(ours.n_latents)
        codes_theirs = theirs.encode(x)
    tol = 1e-4 * max(float(out_ours.abs().mean()), 1.0)
    assert float((out_ours - out_theirs).abs().max()) <= tol, type(theirs).__name__
    assert float((codes_ours - codes_theirs).abs().max()) <= tol, type(theirs).__name__
