"""A README.md model card for a saved dictionary folder, generated from its own files.

Everything on the card is read from the folder (cfg.json, and saetrain_run.json when saetrain made
it) plus the final metrics, so a card cannot describe a different dictionary than the one beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saetrain.atomic import atomic_write_bytes
from saetrain.dictionaries import KINDS, architecture_named
from saetrain.export.saelens import CFG_FILE, RUN_FILE

CARD_FILE = "README.md"

# Metrics in the order a reader looks for them, with what each means; others follow, sorted.
METRIC_DOCS: dict[str, str] = {
    "fvu": "fraction of variance unexplained (held-out tokens)",
    "mse": "mean squared error per element",
    "l0": "mean active latents per token",
    "never_fired_fraction": "share of latents that fired on none of the never_fired_tokens",
    "never_fired_tokens": "held-out tokens never_fired_fraction was measured over",
    "never_fired_count": "latents that fired on none of the held-out tokens",
    "dead_fraction": "share of latents that did not fire in the last dead_window_tokens of "
    "training (AuxK's dead latents)",
    "dead_window_tokens": "training window of dead_fraction: trainer.dead_after_tokens, or every "
    "token trained when the run was shorter",
    "ce_clean": "LM next-token loss, site untouched",
    "ce_spliced": "LM loss with the dictionary's output spliced in",
    "ce_zero_ablated": "LM loss with the site set to zero",
    "delta_ce": "ce_spliced − ce_clean",
    "ce_recovered": "(zero − spliced) / (zero − clean)",
    "kl_div": "KL(clean ‖ spliced) per token",
    "tokens": "held-out tokens the reconstruction metrics were measured over",
    "absorption/mean_absorption_fraction_score": "feature absorption, first-letter task "
    "(SAEBench 0.6.0's fraction score; older SAEBench tables used a ~10× smaller definition)",
    "absorption/mean_full_absorption_score": "share of the probe's true positives where one "
    "non-main latent carries the letter and the main latents are silent (SAEBench)",
    "absorption/mean_num_split_features": "main latents per letter (k-sparse probing, F1 jumps "
    "≥ 0.03)",
    "absorption/probe_mean_f1": "ground-truth first-letter probe's test F1 on the LM's "
    "activations, mean over letters (absorption needs > 0.6 on 20 letters)",
    "absorption/probe_letters_above_min_f1": "letters whose ground-truth probe F1 exceeds 0.6",
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_metric(key: str, value: Any) -> str:
    """Token and latent counts in full (16,384, not 1.638e+04); other metrics as `_fmt`."""
    counted = key == "tokens" or key.endswith(("_tokens", "_count"))
    if counted and isinstance(value, int | float) and float(value).is_integer():
        return f"{int(value):,}"
    return _fmt(value)


def render_model_card(
    folder: str | Path,
    metrics: dict[str, Any],
    repo_id: str | None = None,
    sae_id: str | None = None,
) -> str:
    """The card's Markdown for the dictionary in `folder` with its final `metrics`; `sae_id` is
    its path in the repo (default: the folder's name)."""
    folder = Path(folder)
    cfg = _read_json(folder / CFG_FILE)
    if not cfg:
        raise FileNotFoundError(f"{folder / CFG_FILE} does not exist; is {folder} a dictionary?")
    run_info = _read_json(folder / RUN_FILE)
    run_cfg = run_info.get("config", {})
    meta = cfg.get("metadata", {})
    arch = meta.get("saetrain_architecture") or cfg.get("architecture", "standard")
    transcoder = "hook_name_out" in meta or "d_out" in cfg
    dict_cfg = run_cfg.get("dictionary", {})
    data_cfg = run_cfg.get("data", {})

    kind = KINDS.get(meta.get("saetrain_kind", "single"), KINDS["single"])
    title = kind.kind_title or ("Transcoder" if transcoder else "Sparse autoencoder")
    architecture = architecture_named(arch)
    rows: list[tuple[str, Any]] = [
        ("kind", title.lower()),
        ("architecture", f"{arch} (SAELens `{cfg.get('architecture', 'standard')}`)"),
        ("model", meta.get("model_name", cfg.get("model_name", "unknown"))),
        ("hook", meta.get("hook_name", cfg.get("hook_name", "unknown"))),
    ]
    if "saetrain_sites" in meta:  # a crosscoder's sources, a CLT's layers
        rows.append(("sites", ", ".join(meta["saetrain_sites"])))
        if "saetrain_target_sites" in meta:
            rows.append(("target sites", ", ".join(meta["saetrain_target_sites"])))
    elif "saetrain_site" in meta:
        rows.append(("site", meta["saetrain_site"]))
    if transcoder:
        rows.append(("target hook", meta.get("hook_name_out", "unknown")))
        if "saetrain_target_site" in meta and "saetrain_target_sites" not in meta:
            rows.append(("target site", meta["saetrain_target_site"]))
    rows += [("d_in", cfg.get("d_in")), ("d_sae (latents)", cfg.get("d_sae"))]
    if transcoder:
        rows.append(("d_out", cfg.get("d_out", cfg.get("d_in"))))
    if "k" in cfg:
        rows.append(("k", cfg["k"]))
    elif architecture is not None and architecture.selects_k and "k" in dict_cfg:
        rows.append(("k (training)", dict_cfg["k"]))
    penalised = architecture is not None and architecture.penalised
    if penalised and "sparsity_coefficient" in dict_cfg:
        rows.append(("λ (sparsity coefficient)", dict_cfg["sparsity_coefficient"]))
    if data_cfg:
        dataset = data_cfg.get("path", "unknown")
        if dataset == "text":
            dataset = "local text files: " + ", ".join(data_cfg.get("data_files", []))
        elif data_cfg.get("name"):
            dataset = f"{dataset} ({data_cfg['name']})"
        rows.append(("dataset", dataset))
    elif "dataset_path" in meta:
        rows.append(("dataset", meta["dataset_path"]))
    rows.append(("context size", meta.get("context_size", data_cfg.get("context_size", "unknown"))))
    if "tokens_seen" in run_info:
        rows.append(("tokens trained", f"{run_info['tokens_seen']:,}"))
    if run_info.get("git_revision"):
        rows.append(("saetrain revision", run_info["git_revision"]))

    name = folder.name
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "  - sparse-autoencoder",
        "  - saetrain",
        "---",
        "",
        f"# {title} `{name}`",
        "",
        "Trained with saetrain; saved in the SAELens layout "
        "(`cfg.json` + `sae_weights.safetensors`). Weights work on raw activations: the training "
        "normalisation is folded in."
        + (
            " A crosscoder or cross-layer transcoder has saetrain's own tensor layout (see "
            "saetrain's README); SAELens does not load it"
            + (
                "; `circuit_tracer/` holds circuit-tracer's files."
                if "circuit_tracer" in kind.export_extras
                else "."
            )
            if not kind.saelens_loadable
            else ""
        ),
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {_fmt(value)} |" for key, value in rows],
        "",
        "## Final metrics",
        "",
    ]
    if metrics:
        ordered = [k for k in METRIC_DOCS if k in metrics]
        ordered += sorted(k for k in metrics if k not in METRIC_DOCS)
        lines += ["| metric | value | meaning |", "|---|---|---|"]
        lines += [
            f"| {k} | {_fmt_metric(k, metrics[k])} | {METRIC_DOCS.get(k, '')} |" for k in ordered
        ]
    else:
        lines.append("No metrics were recorded.")
    where = f'"{repo_id}", "{sae_id or name}"' if repo_id else '"<user>/<repo>", "<folder>"'
    lines += [
        "",
        "## Loading",
        "",
    ]
    if kind.saelens_loadable:
        lines += [
            "With SAELens (≥ 6; `sae_id` is this folder's name in the repo):",
            "",
            "```python",
            "from sae_lens import SAE",
            "",
            f"sae = SAE.from_pretrained({where})",
            "# or, from a local copy of this folder (older SAELens: "
            "SAE.load_from_pretrained(path)):",
            f'sae = SAE.load_from_disk("path/to/{name}")',
            "```",
            "",
        ]
        if meta.get("saetrain_norm_affine_folded"):
            lines += [
                "Its weights are written for TransformerLens's `ln2.hook_normalized`, which fires "
                "before the MLP norm's weight: the norm's affine is folded in, and "
                "`saetrain_norm_affine.safetensors` holds it so that saetrain's loader gives the "
                "dictionary back for the model's own MLP input. Codes and the spliced model are "
                "exact; a reconstruction error measured at that hook weights each channel by "
                "1/weight², so a norm weight near zero can dominate it (the metrics above are "
                "the model's own MLP input's).",
                "",
            ]
    if meta.get("saetrain_hook_not_transformer_lens"):
        why = meta["saetrain_hook_not_transformer_lens"]
        reasons = "; ".join(f"{side}: {text}" for side, text in why.items())
        lines += [
            f"Its hook is named `{meta.get('hook_name')}`"
            + (f" → `{meta['hook_name_out']}`" if "hook_name_out" in meta else "")
            + ", saetrain's site names, not TransformerLens hooks: the TransformerLens hook "
            "for that site (`ln2.hook_normalized`) fires before the MLP norm's scale, and this "
            "dictionary could not be rewritten for that tensor, so its weights are for the "
            f"model's own tensor (the norm's output) — {reasons}. Attach it to the norm's "
            "output (saetrain: `read_activations(text, site)`); at `ln2.hook_normalized` it "
            "would read another tensor.",
            "",
        ]
    lines += [
        "With saetrain:",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from saetrain.export.saelens import load_dictionary",
        "",
    ]
    if repo_id:
        lines.append(f'root = snapshot_download("{repo_id}", allow_patterns=["{name}/*"])')
        lines.append(f'sae = load_dictionary(f"{{root}}/{name}")')
    else:
        lines.append(f'sae = load_dictionary("path/to/{name}")')
    lines += [
        "x_hat = sae(activations)  # [..., d_in] → reconstruction (a transcoder: the prediction)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: str | Path,
    metrics: dict[str, Any],
    repo_id: str | None = None,
    sae_id: str | None = None,
) -> Path:
    """Write README.md into `folder` (atomically) and return its path."""
    path = Path(folder) / CARD_FILE
    atomic_write_bytes(path, render_model_card(folder, metrics, repo_id, sae_id).encode())
    return path
