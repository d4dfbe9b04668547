"""Usefulness evaluations: are the latents features a researcher can use?

FVU, L0 and CE say how well a dictionary reconstructs. The suites here ask whether its latents
line up with concepts: feature absorption (first-letter task, as SAEBench computes it) and sparse
probing (k-sparse probes on the latents against dense probes on the LM's own activations).

Every suite is a function `(SuiteContext, <its config>) -> SuiteResult` registered in `SUITES`
under the name `eval.suite` uses; the evaluate CLI, the run and the sweep all call them through
that table, so a suite is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from saetrain.activations.source import ActivationSource
    from saetrain.dictionaries.base import Dictionary


@dataclass
class SuiteContext:
    """What a usefulness suite gets: the LM, the dictionary and where it reads.

    `dictionary` works on raw activations in the model's space (folded, eval mode, on `device`).
    `source` reads `input_sites` from `model`; a transcoder's suites read its input site (what its
    encoder sees), so `input_sites` holds the input side only.
    """

    model: torch.nn.Module
    tokenizer: Any
    dictionary: Dictionary
    source: ActivationSource
    input_sites: list[str]
    model_name: str
    # A name for the dictionary in result files (its folder's name).
    sae_name: str
    device: torch.device
    seed: int
    # Where the suite writes its files (SAEBench-layout JSON, plots).
    output_dir: Path


@dataclass
class SuiteResult:
    """A suite's outcome.

    `metrics`: flat scalars merged into the run's / evaluation's metrics, each key prefixed with
    the suite's name and a slash (`absorption/mean_absorption_fraction_score`). A number that would
    mean nothing (e.g. the ground-truth probe is too weak) is left out and `notes` says why.
    `saebench`: the result in SAEBench's result-JSON layout (eval_type_id, eval_config, eval_id,
    datetime_epoch_millis, eval_result_metrics, eval_result_details, ...), written to
    `<output_dir>/<suite>_saebench.json` by the caller.
    """

    metrics: dict[str, float]
    saebench: dict[str, Any]
    notes: list[str] = field(default_factory=list)
