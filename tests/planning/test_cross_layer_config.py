"""Cross-layer dictionaries (issue 12): what the config refuses, with a message naming the field
and the valid choices, and site.layers out of the model's range refused before the LM loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import saetrain
from saetrain.errors import ConfigError
from saetrain.planning.expand import dictionary_configs
from saetrain.run import run
from tests.helpers.runs import _tiny_overrides


def _overrides(extra: list[str]) -> list[str]:
    # a model folder is not needed to validate; the paths only have to look like the tiny run's
    return _tiny_overrides(Path("/nonexistent/model"), Path("/nonexistent/corpus")) + extra


def _refused(extra: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        saetrain.config_from_overrides(_overrides(extra))
    return str(info.value)


@pytest.mark.parametrize(
    "target", ["site.target=mlp_out.1", "site.target=null", "site.target=mlp_in.*"],
    ids=["no-star", "null", "same-as-input"],
)  # fmt: skip
def test_clt_needs_a_star_target(target):
    msg = _refused(["site.input=mlp_in.*", target, "site.layers=[0,1]", "dictionary.kind=clt"])
    assert "site.target" in msg
    assert "site.target=mlp_out.*" in msg  # the valid form, as an example
    if target != "site.target=mlp_out.1":  # (a fixed target is refused for every kind)
        assert "dictionary.kind=clt" in msg


def test_crosscoder_refuses_a_target():
    msg = _refused(["site.input=resid_post.*", "site.target=mlp_out.*", "site.layers=[0,1]",
                    "dictionary.kind=crosscoder"])  # fmt: skip
    assert "dictionary.kind=crosscoder" in msg and "site.target" in msg and "null" in msg


@pytest.mark.parametrize("kind", ["crosscoder", "clt"])
def test_multi_site_kinds_need_a_star_input(kind):
    extra = ["site.input=resid_post.1", f"dictionary.kind={kind}"]
    if kind == "clt":
        extra.append("site.target=mlp_out.*")
    msg = _refused(extra)
    assert f"dictionary.kind={kind}" in msg and "site.input" in msg and "*" in msg


def test_layers_without_a_star_are_refused():
    msg = _refused(["site.input=resid_post.1", "site.layers=[0,1]"])
    assert "site.layers=[0, 1]" in msg and "site.input" in msg and "*" in msg


def test_unknown_kind_names_the_choices():
    msg = _refused(["dictionary.kind=diagonal"])
    assert "dictionary.kind='diagonal'" in msg
    assert "single, crosscoder, clt" in msg


@pytest.mark.parametrize("arch", ["gated", "matryoshka"])
def test_architectures_a_clt_does_not_train_are_refused(arch):
    from saetrain.dictionaries.layout import CLT_ARCHITECTURES

    assert arch not in CLT_ARCHITECTURES
    msg = _refused(["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,1]",
                    "dictionary.kind=clt", f"dictionary.architecture={arch}"])  # fmt: skip
    assert f"dictionary.architecture={arch!r}" in msg and "dictionary.kind=clt" in msg
    assert ", ".join(CLT_ARCHITECTURES) in msg
    assert {"relu", "topk", "jumprelu"} <= set(CLT_ARCHITECTURES)


def test_crosscoder_skip_is_refused():
    msg = _refused(["site.input=resid_post.*", "site.layers=[0,1]", "dictionary.kind=crosscoder",
                    "dictionary.skip=true"])  # fmt: skip
    assert "dictionary.skip" in msg


def test_the_accepted_forms_validate_and_expand():
    clt = saetrain.config_from_overrides(_overrides(
        ["site.input=mlp_in.*", "site.target=mlp_out.*", "dictionary.kind=clt"]))  # fmt: skip
    # site.layers null: every layer of the model, once its layer count is known
    [(name, sub)] = dictionary_configs(clt, n_layers=3)
    assert sub.site.layers == [0, 1, 2] and name == "mlp_in.0-2-mlp_out.0-2"
    crosscoder = ["site.input=resid_post.*", "site.layers=[0,2]", "dictionary.kind=crosscoder"]
    cc = saetrain.config_from_overrides(_overrides(crosscoder))
    [(name, sub)] = dictionary_configs(cc, n_layers=3)
    assert sub.site.layers == [0, 2] and name == "resid_post.0_2"
    saes = saetrain.config_from_overrides(_overrides(["site.input=resid_post.*"]))
    assert [(n, s.site.input, s.site.target) for n, s in dictionary_configs(saes, 3)] == [
        (f"resid_post.{li}", f"resid_post.{li}", None) for li in range(3)
    ]
    tset = saetrain.config_from_overrides(_overrides(
        ["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[1,2]"]))  # fmt: skip
    assert [(n, s.site.input, s.site.target) for n, s in dictionary_configs(tset, 3)] == [
        ("mlp_in.1-mlp_out.1", "mlp_in.1", "mlp_out.1"),
        ("mlp_in.2-mlp_out.2", "mlp_in.2", "mlp_out.2"),
    ]


def test_clt_target_l0_is_checked_against_all_layers_latents():
    cfg = saetrain.config_from_overrides(_overrides(
        ["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,1,2]",
         "dictionary.kind=clt", "dictionary.architecture=jumprelu", "dictionary.n_latents=64",
         "dictionary.target_l0=100"]))  # fmt: skip
    assert cfg.dictionary.target_l0 == 100
    # still refused above the CLT's total (3 × 64)
    _refused(["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,1,2]",
              "dictionary.kind=clt", "dictionary.architecture=jumprelu", "dictionary.n_latents=64",
              "dictionary.target_l0=200"])  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        ["site.input=mlp_in.*", "site.target=mlp_out.*", "dictionary.kind=clt"],
        ["site.input=resid_post.*", "dictionary.kind=crosscoder"],
        ["site.input=mlp_in.*", "site.target=mlp_out.*"],  # a transcoder set
    ],
    ids=["clt", "crosscoder", "transcoder-set"],
)
def test_layers_out_of_range_are_refused_before_the_lm_loads(tiny_model, corpus, tmp_path,
                                                             monkeypatch, extra):  # fmt: skip
    cfg = saetrain.config_from_overrides(
        _tiny_overrides(tiny_model, corpus) + extra + ["site.layers=[0,1,3]"]
    )

    def no_load(*args, **kwargs):
        raise AssertionError("the LM was loaded before the layers were checked")

    monkeypatch.setattr("saetrain.run.load.load_lm", no_load)
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path / "out")
    msg = str(info.value)
    assert "site.layers=[0, 1, 3]" in msg or "layer 3" in msg
    assert "3 layers" in msg and "0..2" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "layers",
    ["[]", "[1,0]", "[0,0,1]", "[-1,0]"],
    ids=["empty", "unsorted", "repeated", "negative"],
)
def test_bad_layer_lists_are_refused_before_the_lm_loads(tiny_model, corpus, tmp_path,
                                                         monkeypatch, layers):  # fmt: skip
    # (validate alone, i.e. config_from_overrides, accepts them: only run()'s preflight, which
    # expands the pattern, refuses them)
    cfg = saetrain.config_from_overrides(
        _tiny_overrides(tiny_model, corpus)
        + ["site.input=resid_post.*", "dictionary.kind=crosscoder", f"site.layers={layers}"]
    )

    def no_load(*args, **kwargs):
        raise AssertionError("the LM was loaded before the layers were checked")

    monkeypatch.setattr("saetrain.run.load.load_lm", no_load)
    with pytest.raises(ConfigError, match=r"site\.layers=\["):
        run(cfg, tmp_path / "out")


def test_pattern_expanding_to_a_backward_transcoder_is_refused_before_the_lm_loads(
    tiny_model, corpus, tmp_path, monkeypatch
):
    direct = _tiny_overrides(tiny_model, corpus) + ["site.input=mlp_in.1", "site.target=mlp_out.0"]
    with pytest.raises(ConfigError, match="does not come after"):
        saetrain.config_from_overrides(direct)

    def no_load(*args, **kwargs):
        raise AssertionError("the LM was loaded: the backward transcoder was not refused")

    monkeypatch.setattr("saetrain.run.load.load_lm", no_load)
    with pytest.raises(ConfigError, match="site.target"):
        cfg = saetrain.config_from_overrides(
            _tiny_overrides(tiny_model, corpus)
            + ["site.input=mlp_in.*", "site.target=mlp_out.0", "site.layers=[0,1]"]
        )
        run(cfg, tmp_path / "out")
