"""The Python API (saetrain.api, re-exported by saetrain): configs from overrides or dataclasses
with the CLI's defaults and messages, train() returning loaded dictionaries and their metrics,
load() doing the exported weights' math, and the Python API page's example run as written."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import saetrain
from saetrain import (
    BufferConfig,
    Config,
    ConfigError,
    DataConfig,
    DictionaryConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from tests.helpers.runs import _tiny_overrides

PYTHON_API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"
TEXT = "w1 w5 w9 w2 w7 w7 w3 w11 w40 w0 w8 w13"


def _tiny_config(model: Path, corpus: Path, **changes) -> Config:
    """The same tiny run built from the dataclasses (the plain Python route)."""
    cfg = Config(
        model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", n_latents=64, k=4),
        trainer=TrainerConfig(
            total_tokens=2048, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8),
        logger=LoggerConfig(log_every=4),
    )
    return dataclasses.replace(cfg, **changes)


def _tiny_lm(model: Path) -> ModelConfig:
    return ModelConfig(name=str(model), gguf_package=None, device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_model, corpus, tmp_path_factory) -> saetrain.TrainResult:
    """Two TopK SAEs from one LM pass, configured with the dataclasses."""
    entries = [{"name": "k4", "dictionary": {"k": 4}}, {"name": "k8", "dictionary": {"k": 8}}]
    cfg = _tiny_config(tiny_model, corpus, dictionaries=entries)
    return saetrain.train(cfg, tmp_path_factory.mktemp("api_run"))


def test_import_is_cheap_and_names_resolve_lazily():
    code = (
        "import sys, saetrain\n"
        "heavy = [m for m in ('torch', 'hydra', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert saetrain.Config.__module__ == 'saetrain.config'\n"
        "assert saetrain.train.__module__ == 'saetrain.api'\n"
        "assert 'load' in dir(saetrain)\n"
        "try:\n    saetrain.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'saetrain' has no attribute 'nope'"


def test_overrides_give_the_clis_config(tmp_path):
    overrides = ["+experiment=smollm2_k_sweep", "dictionary.k=64", "seed=3"]
    cfg = saetrain.config_from_overrides(overrides)
    # configs/trainer/default.yaml, not the dataclass defaults (lr null, 50 warm-up steps)
    assert (cfg.trainer.lr, cfg.trainer.warmup_steps, cfg.trainer.total_tokens) == (
        0.002,
        10,
        200_000,
    )
    assert cfg.data.data_files == [f"{sysconfig.get_paths()['stdlib']}/*.py"]  # the resolver
    assert [(s.name, s.dictionary) for s in cfg.dictionaries] == [
        ("k16", {"k": 16}),
        ("k32", {"k": 32}),
        ("k64", {"k": 64}),
        ("k128", {"k": 128}),
    ]
    assert (cfg.dictionary.k, cfg.seed, cfg.site.input) == (64, 3, "resid_post.6")
    # field for field what the CLI composes
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "--cfg", "job", "--resolve", *overrides],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == dataclasses.asdict(cfg)


def test_errors_carry_the_clis_messages(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "dictionary.architecture=foo"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    with pytest.raises(ConfigError) as from_overrides:
        saetrain.config_from_overrides(["dictionary.architecture=foo"])
    with pytest.raises(ConfigError) as from_dataclasses:
        saetrain.check(Config(dictionary=DictionaryConfig(architecture="foo")))
    message = (
        "dictionary.architecture='foo' is not valid; choose one of: relu, gated, topk, "
        "batchtopk, jumprelu, matryoshka"
    )
    assert proc.stderr.strip() == f"saetrain: error: {message}"
    assert str(from_overrides.value) == str(from_dataclasses.value) == message

    # a relation between fields: the same message from both routes
    relation = "buffer.size_tokens=1000 must be at least twice trainer.batch_tokens=2048"
    with pytest.raises(ConfigError, match=re.escape(relation)):
        saetrain.config_from_overrides(["buffer.size_tokens=1000"])
    with pytest.raises(ConfigError, match=re.escape(relation)):
        saetrain.check(Config(buffer=BufferConfig(size_tokens=1000)))
    # an unknown key added with `+`: saetrain's refusal, word for word (a dataclass route's
    # `dictionaries` entry is named by its place)
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "+dictionary.kk=3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    with pytest.raises(ConfigError) as unknown:
        saetrain.config_from_overrides(["+dictionary.kk=3"])
    assert str(unknown.value).startswith("dictionary.kk: unknown key 'kk'; did you mean 'k'?")
    assert proc.stderr.strip() == f"saetrain: error: {unknown.value}"
    with pytest.raises(ConfigError, match=r"^dictionaries\[0\]\.dictionary\.kk: unknown key 'kk'"):
        saetrain.check(Config(dictionaries=[{"dictionary": {"kk": 3}}]))
    # what Hydra refuses while composing (the CLI's exit code 1) is a ConfigError here too
    with pytest.raises(ConfigError, match=r"^Could not override 'dictionary.kk'.(.|\n)*Key 'kk'"):
        saetrain.config_from_overrides(["dictionary.kk=3"])
    # a wrong type set on a dataclass is caught as the CLI's composition catches it
    with pytest.raises(ConfigError, match=r"Value 'many' .* Integer\s+full_key: dictionary.k"):
        saetrain.check(Config(dictionary=DictionaryConfig(k="many")))
    with pytest.raises(ConfigError, match="expected a saetrain Config, got dict"):
        saetrain.check({"dictionary": {"k": 4}})


def test_train_returns_the_saved_metrics_and_dictionaries(trained):
    assert [t.name for t in trained.dictionaries] == ["k4", "k8"]
    for t, k in zip(trained.dictionaries, (4, 8), strict=True):
        assert t.folder == trained.output_dir / t.name
        run_info = json.loads((t.folder / "saetrain_run.json").read_text())
        assert t.metrics == run_info["final_metrics"]  # the same floats, every key
        assert 0.0 < t.metrics["fvu"] < 1.0 and t.metrics["l0"] == pytest.approx(k)
        assert run_info["tokens_seen"] == 2048
        assert t.dictionary.k == k and not t.dictionary.training
        assert not any(p.requires_grad for p in t.dictionary.parameters())
        saved = load_file(t.folder / "sae_weights.safetensors")
        assert torch.equal(t.dictionary.W_enc, saved["W_enc"])  # the exported (folded) weights
    assert trained["k8"] is trained.dictionaries[1] and trained.metrics is trained["k4"].metrics
    with pytest.raises(KeyError, match="it trained: k4, k8"):
        trained["k16"]


def test_read_activations_are_the_lms_hidden_states(trained, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    x = saetrain.read_activations(TEXT, "resid_post.1", _tiny_lm(tiny_model))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = [tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        hidden = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert x.shape == (12, 32)
    torch.testing.assert_close(x, hidden[2][0, 1:])  # after block 1, BOS row left out


def test_load_encodes_and_decodes_with_the_exported_weights(trained, tiny_model):
    folder = trained["k4"].folder
    sae = saetrain.load(folder)
    x = saetrain.read_activations(TEXT, "resid_post.1", _tiny_lm(tiny_model))
    w = load_file(folder / "sae_weights.safetensors")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # raw activations: no scale to apply
    values, indices = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter_(1, indices, values.relu())
    x_hat = z @ w["W_dec"] + w["b_dec"]

    codes = sae.encode(x)
    assert codes.indices.shape == (12, 4)
    torch.testing.assert_close(codes.to_dense(64), z, rtol=0, atol=1e-5)
    torch.testing.assert_close(sae.decode(codes), x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x.reshape(3, 4, 32)), x_hat.reshape(3, 4, 32))
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 1.0  # it reconstructs raw activations of text like its training text

    double = saetrain.load(folder, dtype="float64")
    assert double.W_enc.dtype == torch.float64
    torch.testing.assert_close(double(x.double()), x_hat.double(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dtype='float8'; choose one of"):
        saetrain.load(folder, dtype="float8")
    with pytest.raises(FileNotFoundError, match="is .* a saved dictionary"):
        saetrain.load(folder.parent)


def _python_api_example() -> str:
    text = PYTHON_API_PAGE.read_text()
    section = text[text.index("# Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/python_api.md has no python block"
    return match.group(1)


def test_python_api_page_example_runs(tiny_model, corpus, tmp_path, monkeypatch, capsys):
    """docs/python_api.md's block, verbatim, with the tiny model's overrides appended to the ones it
    passes (later overrides win, as on the command line)."""
    real = saetrain.config_from_overrides
    tiny = _tiny_overrides(tiny_model, corpus)
    monkeypatch.setattr(saetrain, "config_from_overrides", lambda o=(): real([*o, *tiny]))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_api_example(), "docs/python_api.md", "exec"), namespace)

    result, x, codes = namespace["result"], namespace["x"], namespace["codes"]
    assert result.folder == tmp_path / "outputs/python_api/resid_post.1"
    run_info = json.loads((result.folder / "saetrain_run.json").read_text())
    assert result.metrics == run_info["final_metrics"]
    assert run_info["config"]["dictionary"]["k"] == 16  # the page's override stood
    assert x.shape[1] == 32 and x.shape[0] > 5
    assert codes.indices.shape == (x.shape[0], 16)
    torch.testing.assert_close(namespace["x_hat"], namespace["sae"](x))
    out = capsys.readouterr().out
    assert f"{result.metrics['fvu']} {result.metrics['l0']}" in out
    assert f"{x.shape[0]} tokens, FVU on them" in out


def test_matplotlib_is_installed_with_saetrain():
    """The density histogram and the sweep plot come with a plain `pip install`."""
    requirements = metadata.requires("saetrain") or []
    plain = [r for r in requirements if r.startswith("matplotlib") and "extra ==" not in r]
    assert plain, f"matplotlib is not a default dependency: {requirements}"


def test_density_plot_has_a_legend_for_its_threshold(tmp_path, monkeypatch):
    import matplotlib.figure

    from saetrain.evaluation.density import plot_density

    drawn: list = []
    save = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    freqs = torch.tensor([0.0, 1e-4, 1e-3, 0.02, 0.3, 0.5])
    path = plot_density(freqs, tmp_path / "density.png", "t", dense_threshold=0.2)
    assert path == tmp_path / "density.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    legend = drawn[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "dense threshold: fires on > 0.2 of tokens"
    ]
