"""Rebuild the foreign-format fixtures under tests/fixtures/<tool>/ with each tool's own code.

Run it in a scratch virtualenv that holds the tool (never a saetrain dependency), from the
repository root, once per tool:

    python3 -m venv /tmp/peer-sparsify
    /tmp/peer-sparsify/bin/pip install -c constraints-cpu.txt eai-sparsify
    /tmp/peer-sparsify/bin/python scripts/make_interop_fixtures.py sparsify

and likewise `sae-lens` → `saelens`, `dictionary-learning` → `dictionary_learning`. Each case is
a tiny folder (d_in 16, 32 latents) written by the tool's own save function, with random weights
made non-trivial (biases, decoder norms), and beside it `expected.safetensors`: fixed inputs `x`
[8, d_in] and the tool's own dense codes `codes` [8, n] and reconstruction `recon` [8, d_out],
computed by the tool's own forward code. tests/export/test_foreign_formats.py checks saetrain
against them.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
D_IN, N_LATENTS, ROWS = 16, 32, 8


def _inputs(seed: int = 0, d_in: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, d_in, generator=g) * 2.0 + 0.5


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Every float parameter (and buffer) replaced by random values of its own scale: biases
    non-zero, decoder rows of varied norm, so that no field's effect hides behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.2))


def _write_expected(
    folder: Path, x: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor
) -> None:
    save_file(
        {
            "x": x.contiguous(),
            "codes": codes.detach().contiguous(),
            "recon": recon.detach().contiguous(),
        },
        str(folder / "expected.safetensors"),
    )


def _fresh(tool: str, case: str) -> Path:
    folder = ROOT / tool / case
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# -- sparsify ---------------------------------------------------------------------------------


def sparsify_cases() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    def case(name: str, **cfg_kwargs) -> None:
        torch.manual_seed(0)
        cfg = SparseCoderConfig(num_latents=N_LATENTS, k=4, **cfg_kwargs)
        sae = SparseCoder(D_IN, cfg)
        _perturb(sae)
        folder = _fresh("sparsify", name)
        sae.save_to_disk(folder)
        x = _inputs()
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(x)
            recon = sae(x).sae_out
        codes = torch.zeros(ROWS, N_LATENTS).scatter_(1, top_indices, top_acts)
        _write_expected(folder, x, codes, recon)

    case("topk")
    case("transcoder_skip", transcode=True, skip_connection=True)
    case("groupmax", activation="groupmax")
    # A run folder around a hookpoint, as sparsify's trainer writes it: config.json names the model.
    run = ROOT / "sparsify" / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ROOT / "sparsify" / "topk", run / "layers.3")
    (run / "config.json").write_text(
        json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 64, "sae": {}})
    )


# -- SAELens ----------------------------------------------------------------------------------


def _saelens_expected(folder: Path, load_from: Path | None = None) -> None:
    """SAELens's own loader on the folder (or on `load_from`, its inference export), run on the
    fixed inputs: the numbers saetrain must reproduce."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(load_from or folder))
    x = _inputs(d_in=sae.cfg.d_in)
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
        if hasattr(sae, "W_skip"):
            recon = sae(x)
    _write_expected(folder, x, codes, recon)


def saelens_cases() -> None:
    import sae_lens as sl

    base = {"d_in": D_IN, "d_sae": N_LATENTS}

    def inference(name: str, cls, cfg_cls, expected: bool = True, **kwargs) -> Path:
        torch.manual_seed(0)
        sae = cls(cfg_cls(**base, **kwargs))
        _perturb(sae)
        folder = _fresh("saelens", name)
        sae.save_model(folder)
        if expected:
            _saelens_expected(folder)
        return folder

    def training(name: str, cls, cfg_cls, perturb=None, **kwargs) -> Path:
        """Written by the training SAE's `save_model` (the training format); the expected
        numbers come from SAELens's inference export of the same SAE."""
        torch.manual_seed(0)
        sae = cls(cfg_cls(**base, **kwargs))
        _perturb(sae)
        if perturb is not None:
            perturb(sae)
        folder = _fresh("saelens", name)
        sae.save_model(folder)
        export = folder.parent / (name + "_inference_tmp")
        shutil.rmtree(export, ignore_errors=True)
        sae.save_inference_model(export)
        _saelens_expected(folder, load_from=export)
        shutil.rmtree(export)
        return folder

    # The case: a TopK trained with rescale_acts_by_decoder_norm (SAELens's default), whose
    # decoder rows are not unit norm, saved in the training format.
    training("topk_training_rescale", sl.TopKTrainingSAE, sl.TopKTrainingSAEConfig, k=4)
    inference("topk", sl.TopKSAE, sl.TopKSAEConfig, k=4)
    inference(
        "topk_inference_rescale",
        sl.TopKSAE,
        sl.TopKSAEConfig,
        k=4,
        rescale_acts_by_decoder_norm=True,
    )
    inference("standard", sl.StandardSAE, sl.StandardSAEConfig)
    inference("gated", sl.GatedSAE, sl.GatedSAEConfig)
    # Gemma Scope's form: a JumpReLU whose encoder reads x itself.
    inference(
        "jumprelu_no_b_dec_input", sl.JumpReLUSAE, sl.JumpReLUSAEConfig, apply_b_dec_to_input=False
    )
    inference("jumprelu", sl.JumpReLUSAE, sl.JumpReLUSAEConfig)
    inference("standard_training", sl.StandardTrainingSAE, sl.StandardTrainingSAEConfig)

    def set_threshold(sae) -> None:
        sae.topk_threshold = torch.tensor(0.15, dtype=torch.double)

    training(
        "batchtopk_training",
        sl.BatchTopKTrainingSAE,
        sl.BatchTopKTrainingSAEConfig,
        perturb=set_threshold,
        k=4,
    )
    training(
        "matryoshka_batchtopk_training",
        sl.MatryoshkaBatchTopKTrainingSAE,
        sl.MatryoshkaBatchTopKTrainingSAEConfig,
        perturb=set_threshold,
        k=4,
        matryoshka_widths=[8, 32],
    )
    inference(
        "transcoder", sl.Transcoder, sl.TranscoderConfig, d_out=12, apply_b_dec_to_input=False
    )
    inference(
        "skip_transcoder",
        sl.SkipTranscoder,
        sl.SkipTranscoderConfig,
        d_out=D_IN,
        apply_b_dec_to_input=False,
    )
    inference(
        "jumprelu_transcoder",
        sl.JumpReLUTranscoder,
        sl.JumpReLUTranscoderConfig,
        d_out=12,
        apply_b_dec_to_input=False,
    )
    inference(
        "jumprelu_skip_transcoder",
        sl.JumpReLUSkipTranscoder,
        sl.JumpReLUSkipTranscoderConfig,
        d_out=D_IN,
        apply_b_dec_to_input=False,
    )
    # An SAE on attn.hook_z: SAELens flattens [.., n_heads, d_head] to d_in, head-major.
    hook_z = inference(
        "hook_z", sl.StandardSAE, sl.StandardSAEConfig, expected=False, reshape_activations="hook_z"
    )
    sae = sl.SAE.load_from_disk(str(hook_z))
    x = _inputs()
    with torch.no_grad():
        codes = sae.encode(x.reshape(ROWS, 4, 4))
        recon = sae.decode(codes).reshape(ROWS, D_IN)
    _write_expected(hook_z, x, codes, recon)
    # Refused: written by SAELens with these settings (expected numbers from SAELens too).
    for norm in ("layer_norm", "constant_norm_rescale", "expected_average_only_in"):
        inference(
            f"normalize_{norm}", sl.StandardSAE, sl.StandardSAEConfig, normalize_activations=norm
        )
    head = inference("hook_head_index", sl.StandardSAE, sl.StandardSAEConfig)
    cfg = json.loads((head / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.attn.hook_z"
    cfg["metadata"]["hook_head_index"] = 1
    (head / "cfg.json").write_text(json.dumps(cfg))
    # A pre-6.0 TopK config (SAELens reads it through its own conversion).
    legacy = inference("topk_legacy", sl.TopKSAE, sl.TopKSAEConfig, k=4)
    cfg = json.loads((legacy / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    for key in ("architecture", "k", "rescale_acts_by_decoder_norm"):
        cfg.pop(key)
    cfg.update(
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 4},
        model_name=meta.get("model_name"),
        hook_name="blocks.0.hook_resid_post",
        sae_lens_training_version="3.0.0",
    )
    (legacy / "cfg.json").write_text(json.dumps(cfg))
    _saelens_expected(legacy)


# -- dictionary_learning ----------------------------------------------------------------------


def dictionary_learning_cases() -> None:
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    def case(name: str, ae, trainer_class: str, **trainer) -> None:
        """ae.pt and config.json as dictionary_learning's trainSAE writes them; the expected
        numbers from the class's own from_pretrained, encode and decode."""
        _perturb(ae)
        if hasattr(ae, "threshold") and ae.threshold.ndim == 0:
            ae.threshold.fill_(0.15)
        folder = _fresh("dictionary_learning", name)
        torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
        config = {
            "trainer": {
                "trainer_class": trainer_class,
                "dict_class": type(ae).__name__,
                "activation_dim": D_IN,
                "dict_size": N_LATENTS,
                "layer": 3,
                "lm_name": "HuggingFaceTB/SmolLM2-135M",
                "submodule_name": "resid_post_layer_3",
                **trainer,
            },
            "buffer": {"d_submodule": D_IN, "ctx_len": 64},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=4))
        x = _inputs()
        with torch.no_grad():
            codes = ae.encode(x)
            recon = ae.decode(codes)
        _write_expected(folder, x, codes, recon)

    torch.manual_seed(0)
    case("standard", AutoEncoder(D_IN, N_LATENTS), "StandardTrainer")
    case("gated", GatedAutoEncoder(D_IN, N_LATENTS), "GatedSAETrainer")
    case("topk", AutoEncoderTopK(D_IN, N_LATENTS, 4), "TopKTrainer", k=4)
    case("batchtopk", BatchTopKSAE(D_IN, N_LATENTS, 4), "BatchTopKTrainer", k=4)
    case(
        "matryoshka_batchtopk",
        MatryoshkaBatchTopKSAE(D_IN, N_LATENTS, 4, [8, 24]),
        "MatryoshkaBatchTopKTrainer",
        k=4,
        group_fractions=[0.25, 0.75],
    )
    case("jumprelu", JumpReluAutoEncoder(D_IN, N_LATENTS), "JumpReluTrainer")


CASES: dict[str, Callable[[], None]] = {
    "sparsify": sparsify_cases,
    "saelens": saelens_cases,
    "dictionary_learning": dictionary_learning_cases,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        sys.exit(f"usage: make_interop_fixtures.py {{{','.join(CASES)}}}")
    CASES[sys.argv[1]]()
