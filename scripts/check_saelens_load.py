"""Check that SAELens loads a saved dictionary and computes what saetrain computes.

Needs `sae-lens` installed in the same environment (it is not a dependency of saetrain):

    python scripts/check_saelens_load.py outputs/.../resid_post.6 [--json out.json]

Prints a table (class SAELens picked, max |Δ| of outputs and codes on random inputs at the
activations' scale) and exits 1 when they disagree, 3 when SAELens has no class for the
architecture (saetrain-only: TopK and Gated skip transcoders).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder with cfg.json and sae_weights.safetensors")
    parser.add_argument("--json", help="also write the result as JSON here")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--scale", type=float, default=None, help="input scale")
    args = parser.parse_args()

    try:
        from sae_lens import SAE
    except ImportError:
        print("sae-lens is not installed: pip install sae-lens", file=sys.stderr)
        return 2
    from sae_lens.registry import SAE_CLASS_REGISTRY

    from saetrain.dictionaries import SparseCodes
    from saetrain.export.saelens import CFG_FILE, load_dictionary

    ours = load_dictionary(args.folder)
    with open(f"{args.folder}/{CFG_FILE}") as f:
        architecture = json.load(f)["architecture"]
    if architecture not in SAE_CLASS_REGISTRY:
        print(f"architecture {architecture!r} has no SAELens class (saetrain loads it)")
        return 3
    theirs = SAE.load_from_disk(args.folder, device="cpu")
    scale = args.scale or float(ours.b_dec.detach().norm() / ours.d_in**0.5) or 1.0
    x = torch.randn(args.rows, ours.d_in, generator=torch.Generator().manual_seed(0)) * scale
    x = x + ours.b_dec.detach()
    with torch.no_grad():
        out_ours, out_theirs = ours(x), theirs(x)
        if isinstance(out_theirs, tuple):  # SAELens transcoders return (output, codes)
            out_theirs = out_theirs[0]
        codes_ours = ours.encode(x)
        if isinstance(codes_ours, SparseCodes):
            codes_ours = codes_ours.to_dense(ours.n_latents)
        codes_theirs = theirs.encode(x)
    result = {
        "folder": args.folder,
        "saelens_class": type(theirs).__name__,
        "max_abs_diff_output": float((out_ours - out_theirs).abs().max()),
        "mean_abs_output": float(out_ours.abs().mean()),
        "max_abs_diff_codes": float((codes_ours - codes_theirs).abs().max()),
    }
    tol = 1e-4 * max(result["mean_abs_output"], 1.0)
    result["agree"] = result["max_abs_diff_output"] <= tol and result["max_abs_diff_codes"] <= tol
    for key, value in result.items():
        print(f"{key:<22} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
