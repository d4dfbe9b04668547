"""Sites of different widths in one run: attn_z (n_heads × head_dim = 48) beside d_model (32).

A tiny Llama with head_dim = 12 and 4 heads: an SAE on attn_z, a transcoder attn_z → attn_out and
an SAE on resid_mid (named by its TransformerLens hook) train on one stream whose rows hold
48 + 32 + 32 columns, through the disk cache; each is exported with SAELens's hook names and
evaluated back from its folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saetrain.activations.sites import SiteError
from saetrain.config import (
    BufferConfig,
    CacheConfig,
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
from saetrain.evaluate import evaluate_path
from saetrain.evaluation.folder import site_from_tl_hook
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from saetrain.synthetic.tiny_llama import build_corpus, build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

Z, D = 48, 32  # attn_z width, d_model
EVAL_OVERRIDES = ["eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8"]
COMPARED = ("fvu", "mse", "l0", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_div")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama's tokenizer, with a model whose heads are wider than d_model / n_heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide_heads")
    folder = build_tiny_llama(root / "model")
    config = LlamaConfig.from_pretrained(folder)
    config.head_dim = 12
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder, build_corpus(root / "corpus")


def _config(tiny: tuple[Path, Path], cache: Path) -> Config:
    model, corpus = tiny
    return Config(
        model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="attn_z.1"),
        dictionaries=[
            DictionarySpec(site={"input": "attn_z.1"}),
            DictionarySpec(site={"input": "attn_z.1", "target": "attn_out.1"}),
            DictionarySpec(site={"input": "blocks.1.hook_resid_mid"}),
        ],
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        cache=CacheConfig(dir=str(cache), shard_tokens=512),
        dictionary=DictionaryConfig(architecture="topk", n_latents=64, k=4),
        trainer=TrainerConfig(
            total_tokens=2048, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8),
        logger=LoggerConfig(log_every=4),
    )


@pytest.fixture(scope="module")
def trained(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("run")
    return run(_config(tiny, root / "cache"), root / "out"), root


def test_widths_through_training_and_export(trained) -> None:
    result, root = trained
    names = [d.name for d in result.dictionaries]
    assert names == ["attn_z.1", "attn_z.1-attn_out.1", "resid_mid.1"]
    shapes = {"attn_z.1": (Z, Z), "attn_z.1-attn_out.1": (Z, D), "resid_mid.1": (D, D)}
    for d in result.dictionaries:
        m = d.metrics
        # Trained: well under the FVU of predicting zero (0.77 / 1.41, 1.00 / 1.57, 0.67 / 1.06).
        assert 0.0 < m["fvu"] < 0.8 * m["fvu_zero_baseline"], d.name
        assert m["l0"] > 0 and m["ce_clean"] > 0 and m["ce_zero_ablated"] > 0
        loaded = load_dictionary(d.dictionary_dir)
        assert (loaded.d_in, loaded.d_out) == shapes[d.name]
        assert loaded.W_enc.shape == (shapes[d.name][0], 64)
        assert loaded.W_dec.shape == (64, shapes[d.name][1])

    cfg = {
        d.name: json.loads((d.dictionary_dir / "cfg.json").read_text()) for d in result.dictionaries
    }
    z = cfg["attn_z.1"]
    assert z["d_in"] == Z and z["reshape_activations"] == "hook_z"
    assert z["metadata"]["hook_name"] == z["hook_name"] == "blocks.1.attn.hook_z"
    tc = cfg["attn_z.1-attn_out.1"]
    assert (tc["d_in"], tc["d_out"], tc["reshape_activations"]) == (Z, D, "hook_z")
    assert tc["metadata"]["hook_name_out"] == "blocks.1.hook_attn_out"
    mid = cfg["resid_mid.1"]
    assert mid["metadata"]["hook_name"] == "blocks.1.hook_resid_mid"
    assert mid["metadata"]["saetrain_site"] == "resid_mid.1"
    assert (mid["d_in"], mid["reshape_activations"]) == (D, "none")

    run_info = json.loads((result.dictionaries[0].dictionary_dir / "saetrain_run.json").read_text())
    stream = run_info["stream"]
    assert stream["sites"] == ["attn_z.1", "attn_out.1", "resid_mid.1"]
    assert stream["buffer_bytes"] == 1024 * (Z + D + D) * 4  # float32 rows, 112 wide

    # The cache files each site at its own width, cut at the right columns: attn_out is attn_z
    # times W_O (Llama's o_proj has no bias).
    shards = sorted((root / "cache").glob("*/shard-*.safetensors"))
    assert shards
    tensors = load_file(shards[0])
    widths = {k: v.shape[1] for k, v in tensors.items()}
    assert widths == {"attn_z.1": Z, "attn_out.1": D, "resid_mid.1": D}
    w_o = load_file(Path(run_info["config"]["model"]["name"]) / "model.safetensors")
    w_o = w_o["model.layers.1.self_attn.o_proj.weight"]
    assert w_o.shape == (D, Z)
    torch.testing.assert_close(
        tensors["attn_z.1"] @ w_o.T, tensors["attn_out.1"], atol=1e-6, rtol=1e-4
    )
    assert tensors["attn_out.1"].abs().mean() > 1e-4


def test_cached_rerun_trains_from_the_cache(trained, tiny, tmp_path: Path) -> None:
    """A second run reads the 112-wide rows back from the cache alone and trains as well (the
    cache serves its chunks in another order, so the numbers are close, not equal)."""
    result, root = trained
    again = run(_config(tiny, root / "cache"), tmp_path)
    info = json.loads((again.dictionaries[0].dictionary_dir / "saetrain_run.json").read_text())
    assert info["stream"]["lm_tokens"] == 0 and info["stream"]["cached_tokens"] >= 2048
    for first, second in zip(result.dictionaries, again.dictionaries, strict=True):
        assert second.metrics["fvu"] == pytest.approx(first.metrics["fvu"], rel=0.05)
        assert second.metrics["ce_clean"] == pytest.approx(first.metrics["ce_clean"], rel=1e-9)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_evaluate_folder_round_trip(trained, tiny, tmp_path: Path, index: int) -> None:
    """From the run's record, and from cfg.json's hook names alone (as another tool's folder)."""
    result, _ = trained
    d = result.dictionaries[index]
    sites = d.name.split("-")
    report = evaluate_path(d.dictionary_dir, [f"output_dir={tmp_path / 'own'}"])
    assert [report.resolved.input_site, report.resolved.target_site][: len(sites)] == sites
    for key in COMPARED:
        assert report.metrics[key] == pytest.approx(d.metrics[key], rel=1e-9), key

    model, corpus = tiny
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(d.dictionary_dir / "sae_weights.safetensors", foreign)
    cfg = json.loads((d.dictionary_dir / "cfg.json").read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if not k.startswith("saetrain_")}
    (foreign / "cfg.json").write_text(json.dumps(cfg))
    data = ["data.path=text", f"data.data_files=[{corpus}/*.txt]", "data.holdout_percent=10"]
    report = evaluate_path(foreign, [*data, *EVAL_OVERRIDES])
    r = report.resolved
    assert r.source == "cfg.json"
    assert (r.input_site, r.target_site) == (sites[0], sites[-1])
    for key in COMPARED:
        assert report.metrics[key] == pytest.approx(d.metrics[key], rel=1e-9), key


@pytest.mark.parametrize(
    "hook, site",
    [
        ("blocks.3.hook_resid_mid", "resid_mid.3"),
        ("blocks.3.attn.hook_z", "attn_z.3"),
        ("blocks.0.ln2.hook_normalized", "mlp_in.0"),
    ],
)
def test_cfg_json_hook_names_map_to_sites(hook: str, site: str) -> None:
    assert site_from_tl_hook(hook) == site


@pytest.mark.parametrize("hook", ["blocks.3.attn.hook_q", "blocks.3.hook_mlp_in", "resid_mid.3"])
def test_unknown_cfg_json_hook_names_the_fix(hook: str) -> None:
    with pytest.raises(
        SiteError, match=r"blocks.L.attn.hook_z.*blocks.L.hook_resid_mid.*site.input="
    ):
        site_from_tl_hook(hook)


def test_evaluate_at_a_site_of_another_width_is_named(trained, tmp_path: Path) -> None:
    result, _ = trained
    folder = result.dictionaries[0].dictionary_dir  # the SAE on attn_z.1, d_in 48
    with pytest.raises(ConfigError, match=r"32 wide at attn_out.1 .*d_in is 48"):
        evaluate_path(folder, ["site.input=blocks.1.hook_attn_out", f"output_dir={tmp_path}"])
