"""`python -m saetrain.inspect` on a tiny transcoder set: one LM pass for every layer, the site,
circuit-tracer's feature files read back as its viewer reads them, logit effects against
W_dec·W_U, and bad input exiting 2 before the LM loads."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from saetrain.config import (
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    DictionarySpec,
    EvalConfig,
    InspectRunConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.inspect.__main__ import inspect_path, main
from saetrain.inspect.features import FIELDS, _circuit_tracer_record, read_feature
from saetrain.inspect.logits import logit_effects
from saetrain.run import run

ROOT = Path(__file__).resolve().parents[2]
LAYERS = (0, 1, 2)
SMALL = ["n_tokens=320", "batch_contexts=6", "top_k=4", "per_band=2", "quantile_bands=2",
         "window_before=3", "window_after=1", "logits_k=5"]  # fmt: skip


@pytest.fixture(scope="module")
def transcoder_set(tiny_model, corpus, tmp_path_factory) -> Path:
    """A run folder with one transcoder per layer (mlp_in.L → mlp_out.L), trained together."""
    cfg = Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="mlp_in.0", target="mlp_out.0"),
        buffer=BufferConfig(size_tokens=512, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", n_latents=24, k=3),
        trainer=TrainerConfig(total_tokens=512, batch_tokens=128, warmup_steps=1, init_batches=1),
        eval=EvalConfig(n_tokens=128, batch_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=100),
        dictionaries=[
            DictionarySpec(
                name=f"layer_{L}", site={"input": f"mlp_in.{L}", "target": f"mlp_out.{L}"}
            )
            for L in LAYERS
        ],
    )
    out = tmp_path_factory.mktemp("tc_set")
    run(cfg, out)
    return out


@pytest.fixture(scope="module")
def inspected(transcoder_set):
    return inspect_path(str(transcoder_set), SMALL, keep_records=True)


def test_transcoder_set_writes_sites_and_feature_files(transcoder_set, inspected):
    out = transcoder_set / "inspect"
    assert inspected.index == out / "index.html"
    assert sorted(inspected.sites) == [f"layer_{L}" for L in LAYERS]
    for name, index in inspected.sites.items():
        text = index.read_text()
        assert text.count('href="latents/') == 24, name  # every latent listed
        assert (index.parent / "dictionary.html").is_file()
        assert len(list((index.parent / "latents").glob("*.html"))) == 24
        assert "http://" not in text and "https://" not in text  # nothing fetched
    assert inspected.features == out / "features" / "index.json.gz"
    entries = json.loads(gzip.decompress(inspected.features.read_bytes()))
    assert len(entries) == len(LAYERS)
    for L, entry in zip(LAYERS, entries, strict=True):
        assert entry["filename"] == f"layer_{L}.bin"
        assert len(entry["offsets"]) == 25 and entry["offsets"][0] == 0
        assert (out / "features" / entry["filename"]).stat().st_size == entry["offsets"][-1]


def test_feature_files_round_trip(transcoder_set, inspected):
    out = transcoder_set / "inspect"
    for L in LAYERS:
        records = inspected.records[f"layer_{L}"]
        for j in range(24):
            back = read_feature(out, L, j)
            assert set(back) == set(FIELDS)
            assert back == json.loads(json.dumps(_circuit_tracer_record(records[j])))
            assert back["transcoder_id"] == f"layer_{L}" and back["index"] == j
        fired = [r for r in records if r["count"]]
        assert fired, L
        r = fired[0]
        assert r["examples_quantiles"][0]["quantile_name"] == "Top activations"
        top = r["examples_quantiles"][0]["examples"][0]
        assert max(top["tokens_acts_list"]) == pytest.approx(r["act_max"], rel=1e-4)
        assert len(r["quantile_values"]) == 100 and sum(r["histogram"]) == r["count"]


def test_logit_effects_against_w_dec_w_u(tiny_model, transcoder_set, inspected):
    from saetrain.activations.model import load_lm
    from saetrain.api import load

    lm, tokenizer = load_lm(ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
                            torch.device("cpu"))  # fmt: skip
    sae = load(transcoder_set / "layer_1")
    W_U, gain = lm.lm_head.weight.detach(), lm.model.norm.weight.detach()
    brute = (sae.W_dec * gain) @ W_U.T  # [n, vocab]
    top, _, bottom, _ = logit_effects(sae.W_dec, W_U, gain, k=5, chunk=7)  # chunks of 7 latents
    assert torch.equal(top, brute.topk(5, dim=1).indices)
    assert torch.equal(bottom, brute.topk(5, dim=1, largest=False).indices)
    records = inspected.records["layer_1"]
    for j in range(24):
        want = [tokenizer.decode([i]) for i in brute[j].topk(5).indices.tolist()]
        assert records[j]["top_logits"] == want
        assert records[j]["top_logit_values"] == pytest.approx(brute[j].topk(5).values.tolist(),
                                                               rel=1e-4, abs=1e-6)  # fmt: skip


def test_hydra_run_with_inspect_enabled_and_sae_folder(tiny_model, corpus, tmp_path):
    """`inspect.enabled=true` writes the site after training; an SAE gets no feature files
    unless asked (features=always)."""
    from saetrain.api import config_from_overrides

    parsed = config_from_overrides(["inspect.enabled=true", "inspect.top_k=7"]).inspect
    assert (parsed.enabled, parsed.top_k, parsed.features) == (True, 7, "auto")
    cfg = Config(
        inspect=InspectRunConfig(enabled=True, n_tokens=128, top_k=3),
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=512, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="relu", n_latents=16, k=4),
        trainer=TrainerConfig(total_tokens=256, batch_tokens=128, warmup_steps=1, init_batches=1),
        eval=EvalConfig(n_tokens=128, batch_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=100),
    )
    folder = run(cfg, tmp_path / "run").dictionary_dir
    index = (folder / "inspect" / "index.html").read_text()  # written by the run
    assert index.count('href="latents/') == 16
    assert not (folder / "inspect" / "features").exists()
    result = inspect_path(str(folder), SMALL)
    assert result.features is None and result.index == folder / "inspect" / "index.html"
    result = inspect_path(str(folder), [*SMALL, "features=always", f"output_dir={tmp_path}/o"])
    assert read_feature(tmp_path / "o", 1, 3)["index"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["features=maybe"], "features='maybe'; choose one of: auto, always, never"),
        (["top_k=0"], "top_k=0 must be at least 1"),
        (["window_after=-1"], "window_after=-1 must be 0 or more"),
        (["n_tokenz=3"], "n_tokenz"),
    ],
)
def test_bad_input_exits_2(transcoder_set, capsys, args, message):
    assert main([f"path={transcoder_set}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_dictionary_folder_exits_2(tmp_path, capsys):
    assert main([f"path={tmp_path}"]) == 2
    assert "neither a dictionary folder" in capsys.readouterr().err
    assert main([]) == 2
    assert "path is required" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the site's browser test needs Debian's chromium package "
    "(apt-get install -y chromium; .ci/run installs it)",
)
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def _browser(*args: str) -> str:
    done = subprocess.run([CHROMIUM, *BROWSER_FLAGS, *args], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return done.stdout


@needs_browser
def test_site_in_a_headless_browser(inspected):
    """The index lists every latent and a latent page shows its highlighted contexts, read back
    from the DOM Chromium built from the file (no server); a screenshot is kept."""
    index = inspected.sites["layer_1"]
    dom = _browser("--dump-dom", index.as_uri())
    rows = re.findall(r'<tr data-i="(\d+)"', dom)
    assert sorted(map(int, rows)) == list(range(24))
    for j in range(24):
        assert f'href="latents/{j}.html"' in dom
    record = max(inspected.records["layer_1"], key=lambda r: r["count"])
    page = index.parent / "latents" / f"{record['index']}.html"
    dom = _browser("--dump-dom", page.as_uri())
    shown = sum(len(q["examples"]) for q in record["examples_quantiles"])
    assert dom.count('<div class="ctx') == shown > 0
    assert re.search(r'<span class="a\d+ m" title="[^"]+">', dom)  # the max token, shaded
    assert "Top activations" in dom and "Quantile band 1" in dom
    artefacts = Path(os.environ.get("SAETRAIN_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "inspect_latent_page.png"
    _browser("--window-size=1000,900", f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 1000


def test_cross_layer_transcoder_shape_plugs_in(tiny_model, corpus, tmp_path):
    """Anything cast as units (here a CLT-shaped stand-in: one encoder per layer reading mlp_in.L,
    decoders to every later layer) gets the one LM pass, the site and per-layer feature files."""
    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource
    from saetrain.inspect.collect import CollectSettings
    from saetrain.inspect.pipeline import write_outputs
    from saetrain.inspect.units import InspectUnit, collect_all

    lm, tokenizer = load_lm(ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
                            torch.device("cpu"))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    n, d = 12, 32
    W_enc = [torch.randn(d, n, generator=g) for _ in LAYERS]
    # Layer L's latents write to layers L..2; their logit direction is the sum of those rows.
    W_dec = {(L, T): torch.randn(n, d, generator=g) for L in LAYERS for T in LAYERS if T >= L}
    units = [
        InspectUnit(
            name=f"clt_layer_{L}",
            input_site=f"mlp_in.{L}",
            target_site=f"mlp_out.{LAYERS[-1]}",
            encode=lambda x, L=L: torch.relu(x @ W_enc[L] - 1.0),
            n_latents=n,
            W_dec=sum(W_dec[L, T] for T in LAYERS if T >= L),
        )
        for L in LAYERS
    ]
    source = ActivationSource(lm, [u.input_site for u in units])
    data = DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10)
    batches = TokenSource(data, tokenizer, seed=0).held_out(12, 6)
    stats = collect_all(source, units, batches, CollectSettings(top_k=3, before=2, after=1))
    result = write_outputs(tmp_path, units, stats, lm, tokenizer, features=True, logits_k=4,
                           keep_records=True)  # fmt: skip
    assert result.index == tmp_path / "index.html"
    for L in LAYERS:
        records = result.records[f"clt_layer_{L}"]
        assert [read_feature(tmp_path, L, j) for j in range(n)] == [
            json.loads(json.dumps(_circuit_tracer_record(r))) for r in records
        ]
        assert (tmp_path / f"clt_layer_{L}" / "latents" / f"{n - 1}.html").is_file()


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_a_saved_clt_is_inspected_one_unit_per_layer(tiny_model, corpus, tmp_path, arch):
    """A trained cross-layer transcoder's folder: one site per layer, one feature file per layer,
    each layer's codes its own encoder's (its top activation = the brute-force maximum of the CLT's
    codes of that layer on the same held-out tokens), logits from its decoders summed."""
    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource
    from saetrain.api import load

    cfg = Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="mlp_in.*", target="mlp_out.*", layers=list(LAYERS)),
        buffer=BufferConfig(size_tokens=512, lm_batch_contexts=8),
        dictionary=DictionaryConfig(
            architecture=arch, kind="clt", n_latents=24, k=3, jumprelu_init_threshold=0.05
        ),  # fmt: skip
        trainer=TrainerConfig(total_tokens=512, batch_tokens=128, warmup_steps=1, init_batches=1),
        eval=EvalConfig(n_tokens=128, batch_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=100),
    )
    folder = run(cfg, tmp_path / "run").dictionary_dir
    result = inspect_path(str(folder), SMALL, keep_records=True)
    names = [f"{folder.name}.L{L}" for L in LAYERS]
    assert sorted(result.sites) == names
    entries = json.loads(gzip.decompress(result.features.read_bytes()))
    assert [e["filename"] for e in entries] == [f"layer_{L}.bin" for L in LAYERS]
    clt = load(folder)
    lm, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    inputs = [f"mlp_in.{L}" for L in LAYERS]
    source = ActivationSource(lm, inputs)
    batches = TokenSource(cfg.data, tokenizer, cfg.seed).held_out(20, 6)  # SMALL's 320 tokens
    rows = torch.cat(list(source.rows(iter(batches), inputs, torch.float32)))
    with torch.no_grad():
        codes = clt.encode(rows)
        dense = codes if isinstance(codes, torch.Tensor) else codes.to_dense(clt.n_latents)
    for i, (L, name) in enumerate(zip(LAYERS, names, strict=True)):
        records = result.records[name]
        assert len(records) == 24
        block = dense[:, i * 24 : (i + 1) * 24]
        for j, record in enumerate(records):
            assert record["count"] == int((block[:, j] > 0).sum()), (name, j)
            if record["count"]:
                assert record["act_max"] == pytest.approx(float(block[:, j].max()), rel=1e-4)
        back = read_feature(result.features.parent.parent, L, 0)
        assert back["transcoder_id"] == name and back["index"] == 0


def test_a_saved_crosscoder_is_inspected_over_all_its_sources(tiny_model, corpus, tmp_path):
    """A crosscoder's pages: its codes read every source at once (counts and maxima equal its own
    codes on the same held-out tokens); logit effects from its decoders summed over sources."""
    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import TokenSource
    from saetrain.api import load

    cfg = Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.*", layers=[0, 2]),
        buffer=BufferConfig(size_tokens=512, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", kind="crosscoder", n_latents=24, k=3),
        trainer=TrainerConfig(total_tokens=512, batch_tokens=128, warmup_steps=1, init_batches=1),
        eval=EvalConfig(n_tokens=128, batch_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=100),
    )
    folder = run(cfg, tmp_path / "run").dictionary_dir
    result = inspect_path(str(folder), SMALL, keep_records=True)
    assert result.features is None  # a crosscoder is no transcoder set
    records = result.records[folder.name]
    cc = load(folder)
    lm, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    sources = ["resid_post.0", "resid_post.2"]
    batches = TokenSource(cfg.data, tokenizer, cfg.seed).held_out(20, 6)
    rows = torch.cat(
        list(ActivationSource(lm, sources).rows(iter(batches), sources, torch.float32))
    )
    with torch.no_grad():
        dense = cc.encode(rows).to_dense(cc.n_latents)
    assert sum(r["count"] for r in records) == int((dense > 0).sum())
    for j, record in enumerate(records):
        assert record["count"] == int((dense[:, j] > 0).sum()), j
        if record["count"]:
            assert record["act_max"] == pytest.approx(float(dense[:, j].max()), rel=1e-4)
    summed = cc.W_dec.detach().reshape(24, 2, 32).sum(1)  # each latent's decoders, summed
    W_U, gain = lm.lm_head.weight.detach(), lm.model.norm.weight.detach()
    brute = (summed * gain) @ W_U.T
    for j in range(24):
        want = [tokenizer.decode([i]) for i in brute[j].topk(5).indices.tolist()]
        assert records[j]["top_logits"] == want
