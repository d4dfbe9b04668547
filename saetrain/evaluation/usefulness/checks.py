"""eval.suite and the suites' settings (eval.absorption, eval.sparse_probing) checked before any
model or data is read: names, ranges, scikit-learn installed, every task entry readable."""

from __future__ import annotations

import importlib.util

from saetrain.config import SUITE_NAMES, EvalConfig, SparseProbingConfig
from saetrain.errors import ConfigError
from saetrain.evaluation.usefulness.probing_tasks import check_task_entry
from saetrain.planning.validate import choice, positive


def check_suites(cfg: EvalConfig) -> None:
    """eval.suite names and the absorption suite's ranges (before the LM loads)."""
    for name in cfg.suite:
        choice("eval.suite", name, SUITE_NAMES)
    if cfg.suite and importlib.util.find_spec("sklearn") is None:
        raise ConfigError(
            f"eval.suite={list(cfg.suite)} fits probes with scikit-learn, which is not installed: "
            "pip install saetrain[eval]"
        )
    a = cfg.absorption
    if a.max_words is not None and a.max_words < 10:
        raise ConfigError(f"eval.absorption.max_words={a.max_words} must be at least 10 (or null)")
    if not 0.0 < a.train_fraction < 1.0:
        raise ConfigError(f"eval.absorption.train_fraction={a.train_fraction} must be in (0, 1)")
    if "{word}" not in a.prompt_template:
        raise ConfigError(
            f"eval.absorption.prompt_template={a.prompt_template!r} must contain {{word}}"
        )
    if a.position is not None and a.position >= 0:
        raise ConfigError(
            f"eval.absorption.position={a.position} must be negative (counted from the prompt's "
            "end, -1 is its last token) or null (the word's token)"
        )
    for name, value in [("icl_examples", a.icl_examples), ("max_k", a.max_k),
                        ("min_letters", a.min_letters), ("batch_prompts", a.batch_prompts),
                        ("l1_C", a.l1_C)]:  # fmt: skip
        positive(f"eval.absorption.{name}", value, allow_zero=name == "icl_examples")
    if not 0.0 <= a.min_probe_f1 < 1.0:
        raise ConfigError(f"eval.absorption.min_probe_f1={a.min_probe_f1} must be in [0, 1)")
    if a.min_letters > 26:
        raise ConfigError(f"eval.absorption.min_letters={a.min_letters} must be at most 26")
    positive("eval.absorption.f1_jump_threshold", a.f1_jump_threshold, allow_zero=True)


def check_sparse_probing(sp: SparseProbingConfig) -> None:
    """Ranges and task entries of eval.sparse_probing, before any model or data is read."""
    where = "eval.sparse_probing"
    for name in ("contexts_per_class", "context_length", "batch_contexts"):
        positive(f"{where}.{name}", getattr(sp, name))
    if sp.context_length < 2:
        raise ConfigError(f"{where}.context_length={sp.context_length} must be at least 2")
    if not 0.0 < sp.test_fraction < 1.0:
        raise ConfigError(f"{where}.test_fraction={sp.test_fraction} must be in (0, 1)")
    if (
        round(sp.contexts_per_class * sp.test_fraction) < 1
        or round(sp.contexts_per_class * (1 - sp.test_fraction)) < 2
    ):
        raise ConfigError(
            f"{where}.contexts_per_class={sp.contexts_per_class} with test_fraction="
            f"{sp.test_fraction} leaves no test context or fewer than 2 train contexts per class"
        )
    if not sp.k_values or any(k < 1 for k in sp.k_values):
        raise ConfigError(f"{where}.k_values={list(sp.k_values)} must be positive integers")
    if not sp.tasks:
        raise ConfigError(f"{where}.tasks is empty; name at least one task")
    for i, entry in enumerate(sp.tasks):
        check_task_entry(entry, f"{where}.tasks[{i}]")
