"""Evaluation time of a 6-layer transcoder set (mlp_in.L → mlp_out.L, L = 0-5) on SmolLM2-135M.

Compares one held-out pass and one CE splice per dictionary (what run() did before
`evaluate_dictionaries`) with one held-out pass for all (with and without each dictionary's CE
splice, `eval.splice_each`), and times the whole-set splice that both keep. Random transcoders
of the default architecture (TopK, k 32): the time does not depend on the weights. Counts LM
forwards, checks that both ways give the same numbers, prints JSON.

    python scripts/bench_set_evaluation.py <eval.n_tokens> <eval.ce_contexts>   # e.g. 8192 16
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from saetrain.activations.model import load_lm, resolve_device
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenSource
from saetrain.api import config_from_overrides
from saetrain.dictionaries import build_dictionary
from saetrain.evaluation.evaluate import (
    Evaluated,
    evaluate_dictionaries,
    evaluate_dictionary,
    first_contexts,
    splice_member,
)
from saetrain.evaluation.splice import replacement_lm_metrics

LAYERS = range(6)


def main() -> None:
    n_tokens, ce_contexts = int(sys.argv[1]), int(sys.argv[2])
    cfg = config_from_overrides(
        ["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,1,2,3,4,5]",
         f"eval.n_tokens={n_tokens}", f"eval.ce_contexts={ce_contexts}",
         "dictionary.n_latents=1152"]
    )  # fmt: skip
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_lm(cfg.model, device)
    source = ActivationSource(model, [s for i in LAYERS for s in (f"mlp_in.{i}", f"mlp_out.{i}")])
    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    n_contexts = max(n_tokens // cfg.data.context_size, ce_contexts)
    held_out = tokens.held_out(n_contexts, cfg.eval.batch_contexts)
    ce = first_contexts(held_out, ce_contexts)
    g = torch.Generator().manual_seed(0)
    members = [
        Evaluated(build_dictionary(cfg.dictionary, 576, 576, device, g, True).eval(),
                  [f"mlp_in.{i}"], [f"mlp_out.{i}"])
        for i in LAYERS
    ]  # fmt: skip
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def splice(m: Evaluated) -> dict[str, float]:
        member = splice_member(source, m.dictionary, m.inputs, m.targets)
        return replacement_lm_metrics(source.models, [member], ce)

    def per_dictionary() -> list[dict[str, float]]:
        out = []
        for m in members:
            metrics = evaluate_dictionary(
                source, m.dictionary, held_out, m.inputs, m.targets, compute_ce=False
            )
            out.append(metrics | splice(m))
        return out

    def one_pass(splice_each: bool) -> list[dict[str, float]]:
        out = [metrics for metrics, _ in evaluate_dictionaries(source, members, held_out)]
        return [metrics | splice(m) if splice_each else metrics
                for m, metrics in zip(members, out, strict=True)]  # fmt: skip

    def whole_set() -> dict[str, float]:
        replacement = [splice_member(source, m.dictionary, m.inputs, m.targets) for m in members]
        return replacement_lm_metrics(source.models, replacement, ce)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        forwards[0] = 0
        start = time.time()
        out = fn()
        report[f"{name}_s"] = time.time() - start
        report[f"{name}_forwards"] = forwards[0]
        return out

    report: dict[str, Any] = {
        "held_out_contexts": sum(len(b) for b in held_out),
        "batches": len(held_out),
        "ce_contexts": ce_contexts,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    with torch.no_grad():
        before = timed("per_dictionary", per_dictionary)
        after = timed("one_pass_with_splice_each", lambda: one_pass(True))
        timed("one_pass_no_splice_each", lambda: one_pass(False))
        timed("whole_set_splice", whole_set)
    report["same_numbers"] = before == after
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
