"""eval.suite wired into the run (every dictionary), the evaluate CLI, the model card and the
sweep summary; SAEBench's result-JSON keys; bad suite names named before the LM loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from saetrain.checks import validate
from saetrain.config import (
    AbsorptionConfig,
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    DictionarySpec,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.errors import ConfigError
from saetrain.evaluate import METRICS_FILE, evaluate_path  # noqa: E402
from saetrain.export.model_card import render_model_card  # noqa: E402
from saetrain.run import run  # noqa: E402

SAEBENCH_MEAN_KEYS = {
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
    "mean_num_split_features",
    "std_dev_absorption_fraction_score",
    "std_dev_full_absorption_score",
    "std_dev_num_split_features",
}
EVAL_SMALL = ["eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8",
              "eval.compute_ce=false"]  # fmt: skip
# A random tiny LM cannot spell: thresholds at 0 so that the numbers and files are produced.
PERMISSIVE = AbsorptionConfig(min_probe_f1=0.0, min_letters=1, max_k=3, batch_prompts=32)


def _config(letters_model: tuple[Path, Path], suite: list[str], **kw) -> Config:
    model, corpus = letters_model
    return Config(
        model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", n_latents=64, k=4),
        trainer=TrainerConfig(
            total_tokens=1024, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(
            n_tokens=256, batch_contexts=8, compute_ce=False, suite=suite, absorption=PERMISSIVE
        ),  # fmt: skip
        logger=LoggerConfig(log_every=4),
        **kw,
    )


@pytest.fixture(scope="module")
def trained(letters_model, tmp_path_factory):
    """Two dictionaries (a `dictionaries` run) with eval.suite=[absorption]."""
    cfg = _config(
        letters_model,
        ["absorption"],
        dictionaries=[DictionarySpec(), DictionarySpec(site={"input": "resid_post.2"})],
    )
    return run(cfg, tmp_path_factory.mktemp("run"))


def test_run_puts_suite_metrics_and_saebench_files_in_every_dictionary(trained):
    assert len(trained.dictionaries) == 2
    for result in trained.dictionaries:
        metrics = result.metrics
        for key in ("mean_absorption_fraction_score", "mean_full_absorption_score",
                    "mean_num_split_features", "probe_mean_f1"):  # fmt: skip
            assert 0.0 <= metrics[f"absorption/{key}"] <= 10.0, key
        saved = json.loads((result.dictionary_dir / "saetrain_run.json").read_text())
        assert saved["final_metrics"]["absorption/mean_num_split_features"] == pytest.approx(
            metrics["absorption/mean_num_split_features"]
        )
        out = json.loads((result.dictionary_dir / "absorption_saebench.json").read_text())
        assert out["eval_type_id"] == "absorption_first_letter"
        assert set(out["eval_result_metrics"]["mean"]) == SAEBENCH_MEAN_KEYS
        assert out["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == (
            pytest.approx(metrics["absorption/mean_absorption_fraction_score"])
        )
        for key in ("f1_jump_threshold", "max_k_value", "prompt_template", "prompt_token_pos",
                    "min_GT_probe_f1", "min_feats_for_eval", "model_name"):  # fmt: skip
            assert key in out["eval_config"], key
        detail = out["eval_result_details"][0]
        assert set(detail) == {"first_letter", "mean_absorption_fraction", "full_absorption_rate",
                               "num_full_absorption", "num_probe_true_positives",
                               "num_split_features"}  # fmt: skip
        assert out["eval_id"] and out["datetime_epoch_millis"] > 0
        # What SAEBench's graphing_utils.get_eval_results reads besides the metrics.
        assert out["sae_cfg_dict"]["architecture"] == "topk"
        assert out["sae_cfg_dict"]["d_sae"] == 64
        card = render_model_card(result.dictionary_dir, metrics)
        assert "absorption/mean_absorption_fraction_score" in card
        assert "SAEBench 0.6.0" in card


def test_evaluate_cli_refuses_a_number_when_the_probe_is_weak(trained, tmp_path, capsys):
    folder = trained.dictionaries[0].dictionary_dir
    out = tmp_path / "eval"
    report = evaluate_path(folder, [*EVAL_SMALL, "eval.suite=[absorption]",
                                    "eval.absorption.max_k=2", f"output_dir={out}"])  # fmt: skip
    metrics = report.metrics
    # SAEBench's thresholds (F1 > 0.6 on 20 letters): a random LM cannot spell.
    assert "absorption/mean_absorption_fraction_score" not in metrics
    assert 0.0 <= metrics["absorption/probe_mean_f1"] < 0.6
    assert metrics["absorption/probe_letters_above_min_f1"] < 20
    saved = json.loads((out / METRICS_FILE).read_text())
    assert "too weak" in saved["suite_notes"]["absorption"][0]
    assert not (out / "absorption_saebench.json").exists()
    assert "too weak" in capsys.readouterr().out


def test_evaluate_cli_without_suite_writes_what_it_did(trained, tmp_path):
    folder = trained.dictionaries[0].dictionary_dir
    report = evaluate_path(folder, [*EVAL_SMALL, "eval.suite=[]", f"output_dir={tmp_path}"])
    assert not any(k.startswith("absorption/") for k in report.metrics)
    assert "suite_notes" not in json.loads((tmp_path / METRICS_FILE).read_text())
    assert list(tmp_path.glob("*_saebench.json")) == []


def test_unknown_suite_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"eval\.suite='absorb'.*absorption, sparse_probing"):
        validate(Config(eval=EvalConfig(suite=["absorb"])))
    with pytest.raises(ConfigError, match=r"eval\.absorption\.position=0"):
        validate(Config(eval=EvalConfig(absorption=AbsorptionConfig(position=0))))


def test_every_suite_name_is_registered_to_its_function():
    from saetrain.config import SUITE_NAMES
    from saetrain.evaluation.usefulness.absorption import run_absorption
    from saetrain.evaluation.usefulness.sparse_probing import run_sparse_probing
    from saetrain.evaluation.usefulness.suites import SUITES

    assert set(SUITES) == set(SUITE_NAMES)
    assert SUITES["absorption"] is run_absorption
    assert SUITES["sparse_probing"] is run_sparse_probing


def test_sweep_summary_shows_suite_metrics_per_architecture(tmp_path):
    from saetrain.sweep import SUMMARY_MD, SUMMARY_PNG, summarize_sweep

    for i, (arch, k, l0, absorbed) in enumerate(
        [("topk", 4, 4.0, 0.1), ("topk", 8, 8.0, 0.05), ("relu", 4, 5.0, 0.2)]
    ):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- dictionary.architecture={arch}\n- dictionary.k={k}\n"
        )
        (job / "resid_post.1").mkdir()
        metrics = {"l0": l0, "fvu": 0.1, "delta_ce": 0.2,
                   "absorption/mean_absorption_fraction_score": absorbed}  # fmt: skip
        config = {"dictionary": {"architecture": arch}, "site": {"input": "resid_post.1"}}
        info = {"config": config, "final_metrics": metrics}
        (job / "resid_post.1" / "saetrain_run.json").write_text(json.dumps(info))
    summarize_sweep(tmp_path)
    table = (tmp_path / SUMMARY_MD).read_text()
    assert "| absorption |" in table
    assert "| 0.05 |" in table and "| 0.2 |" in table
    assert "full absorption" not in table  # only the suites' metrics some job has
    assert (tmp_path / SUMMARY_PNG).stat().st_size > 0


def test_hydra_composes_eval_suite_for_a_training_run():
    from hydra import compose, initialize_config_dir

    import saetrain
    from saetrain.checks import to_config
    from saetrain.config import register_configs

    register_configs()
    overrides = ["eval.suite=[absorption,sparse_probing]", "eval.absorption.max_words=500"]
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    assert cfg.eval.suite == ["absorption", "sparse_probing"]
    assert cfg.eval.absorption.max_words == 500
    validate(cfg)
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        default = to_config(compose(config_name="config"))
    assert default.eval.suite == []  # the default job runs no suite


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
    import sys

    from saetrain.evaluation.usefulness.deps import MissingDependency, sklearn_modules

    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(MissingDependency, match=r"pip install saetrain\[eval\]"):
        sklearn_modules()


def test_a_suite_without_scikit_learn_fails_validation(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"eval\.suite=\['absorption'\].*saetrain\[eval\]"):
        validate(Config(eval=EvalConfig(suite=["absorption"])))
    validate(Config())  # no suite: scikit-learn is not needed
