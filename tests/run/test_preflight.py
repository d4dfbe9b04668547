"""Bad input that needs the model's shape or the data is refused before any weights load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import saetrain.run.load as load_module  # where run() looks load_lm up
from saetrain.config import (
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    DictionarySpec,
    EvalConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.errors import ConfigError
from saetrain.planning.model_shape import ModelShape
from saetrain.preflight import preflight
from saetrain.run import run


def _config(tiny_model: Path, corpus: Path) -> Config:
    return Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(k=4),
        trainer=TrainerConfig(total_tokens=1024, batch_tokens=256, warmup_steps=1, init_batches=1),
        eval=EvalConfig(n_tokens=64, batch_contexts=4, ce_contexts=4),
    )


@pytest.fixture
def no_lm(monkeypatch):
    """Fail the test if run() gets as far as loading the LM's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the LM was loaded before the bad input was found")

    monkeypatch.setattr(load_module, "load_lm", refuse)


def test_shape_is_read_from_the_config_alone(tiny_model, corpus):
    shape = preflight(_config(tiny_model, corpus))
    assert shape == ModelShape("llama", 3, 32, 32, 2048)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        # the tiny model has 3 layers and d_model 32: 8 × 32 = 256 latents by default
        ({"site": SiteConfig(input="resid_post.7")}, ["site.input", "layer 7", "0..2"]),
        (
            {"site": SiteConfig(input="mlp_in.1", target="mlp_out.3")},
            ["site.target='mlp_out.3'", "3 layers"],
        ),
        (
            {"dictionary": DictionaryConfig(k=300)},
            ["dictionary.k=300", "expansion_factor=8", "d_in=32", "256 latents"],
        ),
        (
            {"dictionary": DictionaryConfig(k=4, expansion_factor=2, aux_k=100)},
            ["dictionary.aux_k=100", "64 latents"],
        ),
        (
            {
                "dictionary": DictionaryConfig(
                    architecture="matryoshka", k=4, matryoshka_prefixes=[16, 64, 128]
                )
            },
            ["matryoshka_prefixes=[16, 64, 128]", "256 latents"],
        ),
        (
            {
                "dictionaries": [
                    DictionarySpec(),
                    DictionarySpec(dictionary={"k": 64, "expansion_factor": 1}),
                ]
            },
            ["dictionaries[1].dictionary.k=64", "32 latents"],
        ),
        ({"data": "context"}, ["data.context_size=4096", "max_position_embeddings=2048"]),
        ({"data": "missing_folder"}, ["data.path='/no/such/dataset'", "no such folder"]),
        ({"data": "bad_column"}, ["data.text_column='body'", "columns are: text"]),
    ],
)
def test_bad_input_fails_before_the_lm_loads(
    tiny_model, corpus, no_lm, tmp_path, change, fragments
):
    cfg = _config(tiny_model, corpus)
    if change.get("data") == "context":
        change = {"data": dataclasses.replace(cfg.data, context_size=4096)}
    elif change.get("data") == "missing_folder":
        change = {"data": dataclasses.replace(cfg.data, path="/no/such/dataset", data_files=[])}
    elif change.get("data") == "bad_column":
        change = {"data": dataclasses.replace(cfg.data, text_column="body")}
    with pytest.raises(ConfigError) as err:
        run(dataclasses.replace(cfg, **change), tmp_path)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing is written for a run that cannot start"


def test_a_config_that_fits_gets_past_the_checks(tiny_model, corpus, no_lm, tmp_path):
    with pytest.raises(AssertionError, match="the LM was loaded"):
        run(_config(tiny_model, corpus), tmp_path)


def test_a_model_the_hub_cannot_provide_is_named(tiny_model, corpus, no_lm, tmp_path):
    cfg = _config(tiny_model, corpus)
    cfg = dataclasses.replace(cfg, model=ModelConfig(name="no-org/no-model", gguf_package=None))
    with pytest.raises(ConfigError, match="model.name='no-org/no-model'"):
        run(cfg, tmp_path)
