"""Per-latent records: the collected statistics, logit effects and token strings as plain dicts.

One internal representation for both writers (the HTML site and circuit-tracer's feature
files). A record has circuit-tracer's fields (transcoder_id, index, examples_quantiles,
top_logits, bottom_logits, act_min, act_max, quantile_values, histogram, activation_frequency)
plus saetrain's own (count, mean_activation, top_logit_values, bottom_logit_values).
An example is {tokens, tokens_acts_list, train_token_ind, is_repeated_datapoint, row}: the window
around the position `train_token_ind` (its activation is the example's), cut at the context's
edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saetrain.inspect.collect import LatentStats

HISTOGRAM_BINS = 32
# Percentiles 1..100: circuit-tracer's viewer reads quantile_values[i] as the (i+1)-th.
QUANTILES = torch.arange(1, 101, dtype=torch.float64) / 100
TOP_NAME = "Top activations"


class TokenStrings:
    """Token ids → display strings, each id decoded once (alone, so a space shows as a space)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i])
            out.append(self.cache[i])
        return out


@dataclass
class LogitTables:
    """Top and bottom logit effects per latent (ids and values, [n, k] each)."""

    top_ids: torch.Tensor
    top_values: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_values: torch.Tensor


def _short(x: float | torch.Tensor) -> float:
    """Five significant digits: enough to read and to shade, and a smaller file."""
    return float(f"{float(x):.5g}")


def _examples(
    values: torch.Tensor, rows: torch.Tensor, acts: torch.Tensor, tokens: torch.Tensor,
    before: int, strings: TokenStrings, repeated: set[int],
) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for slot in range(values.shape[0]):
        row = int(rows[slot])
        if row < 0:
            continue
        ids = tokens[slot].tolist()
        keep = [i for i, t in enumerate(ids) if t >= 0]
        first = keep[0]
        out.append({
            "tokens": strings([ids[i] for i in keep]),
            "tokens_acts_list": [_short(acts[slot, i]) for i in keep],
            "train_token_ind": before - first,
            "is_repeated_datapoint": row in repeated,
            "row": row,
        })  # fmt: skip
    return out


def latent_record(
    stats: LatentStats,
    j: int,
    transcoder_id: str,
    strings: TokenStrings,
    logits: LogitTables | None,
    quantile_values: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Latent j's record. `quantile_values` ([n, 100], from `stats.quantile_values(QUANTILES)`)
    may be given once for all latents; otherwise it is computed for j."""
    s = stats.settings
    top = _examples(stats.top_values[j], stats.top_rows[j], stats.top_acts[j],
                    stats.top_tokens[j], s.before, strings, set())  # fmt: skip
    top_rows = {e["row"] for e in top}
    sample = _examples(stats.sample_values[j], stats.sample_rows[j], stats.sample_acts[j],
                       stats.sample_tokens[j], s.before, strings, top_rows)  # fmt: skip
    quantiles = [{"quantile_name": TOP_NAME, "examples": top}]
    if sample:
        per = max(1, -(-len(sample) // s.quantile_bands))
        for band, start in enumerate(range(0, len(sample), per)):
            group = sample[start : start + per]
            lo = group[-1]["tokens_acts_list"][group[-1]["train_token_ind"]]
            hi = group[0]["tokens_acts_list"][group[0]["train_token_ind"]]
            name = f"Quantile band {band + 1} of {s.quantile_bands}: random firings, "
            name += f"activations {lo:.3g}–{hi:.3g}"
            quantiles.append({"quantile_name": name, "examples": group})
    if quantile_values is None:
        qv = stats.quantile_values(QUANTILES)[j]
    else:
        qv = quantile_values[j]
    histogram, act_min, act_max = stats.linear_histogram(j, HISTOGRAM_BINS)
    record: dict[str, Any] = {
        "transcoder_id": transcoder_id,
        "index": j,
        "examples_quantiles": quantiles,
        "top_logits": [],
        "bottom_logits": [],
        "act_min": act_min,
        "act_max": act_max,
        "quantile_values": [_short(v) for v in qv],
        "histogram": [float(c) for c in histogram],
        "activation_frequency": float(stats.frequencies[j]),
        "count": int(stats.counts[j]),
        "mean_activation": float(stats.mean_activation[j]),
        "top_logit_values": [],
        "bottom_logit_values": [],
    }
    if logits is not None:
        record["top_logits"] = strings(logits.top_ids[j].tolist())
        record["bottom_logits"] = strings(logits.bottom_ids[j].tolist())
        record["top_logit_values"] = [_short(v) for v in logits.top_values[j]]
        record["bottom_logit_values"] = [_short(v) for v in logits.bottom_values[j]]
    return record
