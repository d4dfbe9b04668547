"""What an architecture or a kind means, asked by name (saetrain/dictionaries/registry.py): the
class attributes say what the names used to be tested for."""

from __future__ import annotations

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import (
    ARCHITECTURES,
    KINDS,
    ReLUSAE,
    architecture_named,
    configured_latents,
    latents_per_input,
    shardable_architectures,
)
from saetrain.dictionaries.clt import CLT_CLASSES
from saetrain.dictionaries.layout import CLT_ARCHITECTURES, CROSSCODER_ARCHITECTURES


def _names(test) -> set[str]:
    return {name for name, cls in ARCHITECTURES.items() if test(cls)}


def test_the_families_and_how_each_is_split_over_ranks():
    assert _names(lambda c: c.selects_k) == {"topk", "batchtopk", "matryoshka"}
    assert _names(lambda c: c.selects_per_batch) == {"batchtopk", "matryoshka"}
    assert _names(lambda c: c.penalised) == {"relu", "gated", "jumprelu"}
    assert _names(lambda c: c.nested_prefixes) == {"matryoshka"}
    assert _names(lambda c: c.latent_sharding == "selection") == {"topk", "batchtopk"}
    assert _names(lambda c: c.latent_sharding == "sums") == {"relu", "gated", "jumprelu"}
    assert shardable_architectures() == ("topk", "batchtopk", "relu", "gated", "jumprelu")
    assert {n: c.selects_per_batch for n, c in CLT_CLASSES.items()} == {
        "topk": False, "batchtopk": True, "jumprelu": False, "relu": False,
    }  # fmt: skip
    assert {n for n, c in CLT_CLASSES.items() if c.elementwise_inference} == {
        "batchtopk", "jumprelu", "relu",
    }  # fmt: skip


def test_saelens_names_of_an_sae_reach_the_same_class():
    assert architecture_named("standard") is ReLUSAE
    assert architecture_named("relu") is ReLUSAE
    assert architecture_named("transcoder") is None and architecture_named("crosscoder") is None


def test_what_each_kind_reads_and_writes():
    single, crosscoder, clt = KINDS["single"], KINDS["crosscoder"], KINDS["clt"]
    assert not single.multi_site and crosscoder.multi_site and clt.multi_site
    assert crosscoder.reconstructs_sources and not clt.reconstructs_sources
    assert clt.writes_later_layers and not crosscoder.writes_later_layers
    assert [k for k, c in KINDS.items() if not c.causal_splice] == ["crosscoder"]
    for flag in ("fine_tunable", "shardable_kind", "saelens_loadable"):
        assert [k for k, c in KINDS.items() if getattr(c, flag)] == ["single"]
    assert single.kind_architectures is None
    assert crosscoder.kind_architectures == CROSSCODER_ARCHITECTURES
    assert clt.kind_architectures == CLT_ARCHITECTURES
    assert {k: c.export_extras for k, c in KINDS.items()} == {
        "single": (), "crosscoder": ("decoder_norm_shares",), "clt": ("circuit_tracer",),
    }  # fmt: skip


def test_latents_a_config_makes():
    cfg = DictionaryConfig(expansion_factor=4)
    assert latents_per_input(cfg, 8) == 32
    assert configured_latents(cfg, (8, 8, 8)) == 32
    clt = DictionaryConfig(kind="clt", n_latents=10, architecture="relu")
    assert configured_latents(clt, (8, 8, 8)) == 30
    assert latents_per_input(clt, 8) == 10
