"""Sparse probing: known answers, the built-in and user tasks, SAEBench's layout, the real LM."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from saetrain.config import DictionaryConfig, ModelConfig, SparseProbingConfig
from saetrain.dictionaries import build_dictionary  # noqa: E402
from saetrain.errors import ConfigError
from saetrain.evaluation.usefulness import SuiteContext  # noqa: E402
from saetrain.evaluation.usefulness.checks import check_sparse_probing
from saetrain.evaluation.usefulness.probing_tasks import (  # noqa: E402
    STDLIB_PACKAGES,
    TaskSizes,
    build_task,
    labelled_positions,
    string_or_comment_spans,
)
from saetrain.evaluation.usefulness.sparse_probing import (  # noqa: E402
    pool_codes,
    run_sparse_probing,
)

D = 16
SIGNAL_WORD = "w1"


class EmbeddingSource:
    """An 'LM' whose activation at a token is a fixed vector per token id: a context's mean is
    known. The signal word's vector is 4·e_0; every other word's has no e_0 component."""

    def __init__(self, vocab: dict[str, int]):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(max(vocab.values()) + 1, D, generator=g)
        self.table[:, 0] = 0.0
        self.table[vocab[SIGNAL_WORD]] = 0.0
        self.table[vocab[SIGNAL_WORD], 0] = 4.0

    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"emb": self.table[input_ids]}

    def width(self, site: str) -> int:
        return D


def planted_dictionary() -> torch.nn.Module:
    """A ReLU SAE whose latent 0 reads e_0 (the planted direction); the other 63 latents read
    random directions with no e_0 component."""
    sae = build_dictionary(
        DictionaryConfig(architecture="relu", n_latents=64), D, D, torch.device("cpu")
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = torch.randn(D, 64, generator=g)
        w[0, :] = 0.0
        w[:, 0] = 0.0
        w[0, 0] = 1.0
        sae.W_enc.copy_(w)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def planted_rows(n_per_class: int, seed: int = 0) -> list[dict]:
    """Texts of 30 words; the signal word is drawn with probability 0.15 in class 'yes' and
    0.08 in class 'no' (the classes overlap: no probe is perfect)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(2, 120)]
    rows = []
    for label, p in (("yes", 0.15), ("no", 0.08)):
        for _ in range(n_per_class):
            text = " ".join(
                SIGNAL_WORD if rng.random() < p else rng.choice(words) for _ in range(30)
            )
            rows.append({"text": text, "label": label})
    return rows


def suite_context(tokenizer, source, dictionary, tmp_path: Path) -> SuiteContext:
    return SuiteContext(
        model=torch.nn.Linear(1, 1),
        tokenizer=tokenizer,
        dictionary=dictionary,
        source=source,  # type: ignore[arg-type]
        input_sites=["emb"],
        model_name="planted",
        sae_name="planted-sae",
        device=torch.device("cpu"),
        seed=0,
        output_dir=tmp_path,
    )


def probing_config(path: Path, **kw) -> SparseProbingConfig:
    return SparseProbingConfig(
        tasks=[{"name": "planted", "path": str(path)}],
        contexts_per_class=500,
        test_fraction=0.4,
        context_length=32,
        **kw,
    )


def test_planted_latent_k1_matches_the_dense_probe(word_tokenizer, tmp_path, one_thread):
    source = EmbeddingSource(word_tokenizer.get_vocab())
    ctx = suite_context(word_tokenizer, source, planted_dictionary(), tmp_path)
    data = write_jsonl(tmp_path / "planted.jsonl", planted_rows(500))
    result = run_sparse_probing(ctx, probing_config(data))
    m = result.metrics
    dense = m["sparse_probing/llm_test_accuracy"]
    k1 = m["sparse_probing/sae_top_1_test_accuracy"]
    # The classes overlap (Bayes accuracy about 0.75): both probes find the signal, and the one
    # latent that holds the direction does as well as all 16 LM dimensions.
    assert 0.65 < dense < 0.9
    assert abs(k1 - dense) < 0.04
    assert abs(m["sparse_probing/llm_top_1_test_accuracy"] - dense) < 0.04
    # latent 0 is the one chosen (its class means differ; no other latent reads e_0).
    top = result.saebench["eval_result_unstructured"]["planted_results"]["top_latents"]
    assert top["no"][0] == 0
    assert m["sparse_probing/planted/sae_top_1_test_accuracy"] == k1


def test_shuffled_labels_give_chance(word_tokenizer, tmp_path, one_thread):
    source = EmbeddingSource(word_tokenizer.get_vocab())
    ctx = suite_context(word_tokenizer, source, planted_dictionary(), tmp_path)
    rows = planted_rows(500)
    labels = [r["label"] for r in rows]
    random.Random(3).shuffle(labels)
    data = write_jsonl(
        tmp_path / "shuffled.jsonl", [{**r, "label": y} for r, y in zip(rows, labels, strict=True)]
    )
    m = run_sparse_probing(ctx, probing_config(data)).metrics
    # 400 test contexts: chance is 0.5 with a standard deviation of 0.025.
    for key in ("llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"):
        assert abs(m[f"sparse_probing/{key}"] - 0.5) < 0.08, key


def test_pooling_is_the_mean_of_each_contexts_codes():
    from saetrain.dictionaries.base import SparseCodes

    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0], [4.0, 0.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0]])
    context_of_row = torch.tensor([0, 0, 1])
    expected = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0]])
    values, indices = dense.topk(2, dim=1)
    tokens = torch.tensor([2, 1])
    for codes in (dense, SparseCodes(indices, values)):
        rows, cols, vals = pool_codes(codes, context_of_row, tokens, 4)
        got = torch.zeros(2, 4)
        got[rows, cols] = vals
        assert torch.equal(got, expected)
        # Rows encoded in two steps: the partial means add up to the same.
        got = torch.zeros(2, 4)
        for part in (slice(0, 1), slice(1, 3)):
            piece = (
                codes[part]
                if isinstance(codes, torch.Tensor)
                else SparseCodes(codes.indices[part], codes.values[part])
            )
            rows, cols, vals = pool_codes(piece, context_of_row[part], tokens, 4)
            got.index_put_((rows, cols), vals, accumulate=True)
        assert torch.equal(got, expected)


def test_wide_dictionary_encodes_in_steps(word_tokenizer, tmp_path, monkeypatch, one_thread):
    from saetrain.evaluation.usefulness import sparse_probing

    ctx = suite_context(
        word_tokenizer, EmbeddingSource(word_tokenizer.get_vocab()), planted_dictionary(), tmp_path
    )
    data = write_jsonl(tmp_path / "planted.jsonl", planted_rows(30))
    cfg = SparseProbingConfig(tasks=[{"path": str(data)}], contexts_per_class=30, context_length=32)
    whole = sparse_probing.pooled_features(ctx, ["w1 w2 w1 w3", "w4 w1"], "mean", cfg, "x")
    monkeypatch.setattr(sparse_probing, "_ENCODE_FLOATS", 3 * 64)  # 3 rows per encode
    steps = sparse_probing.pooled_features(ctx, ["w1 w2 w1 w3", "w4 w1"], "mean", cfg, "x")
    assert np.allclose(whole.codes.toarray(), steps.codes.toarray(), atol=1e-6)
    assert whole.codes[0, 0] == pytest.approx(2 * 4.0 / 4)  # latent 0: w1 twice in 4 tokens


SIZES = TaskSizes(contexts_per_class=40, test_fraction=0.25, context_length=64, seed=0)


@pytest.mark.parametrize(
    "name", ["stdlib_package", "stdlib_test_module", "python_string_or_comment"]
)
def test_builtin_tasks_are_offline_balanced_disjoint_and_deterministic(name):
    data = build_task(name, SIZES)
    again = build_task(name, SIZES)
    assert data.train == again.train and data.test == again.test
    assert build_task(name, TaskSizes(40, 0.25, 64, seed=1)).train != data.train
    expected_classes = {
        "stdlib_package": set(STDLIB_PACKAGES),
        "stdlib_test_module": {"test", "library"},
        "python_string_or_comment": {"string_or_comment", "code"},
    }[name]
    assert set(data.classes) == expected_classes
    assert {len(v) for v in data.train.values()} == {30}
    assert {len(v) for v in data.test.values()} == {10}
    train = {t for v in data.train.values() for t in v}
    test = {t for v in data.test.values() for t in v}
    assert not train & test
    assert all(t.strip() for t in train | test)
    assert data.pooling == ("last" if name == "python_string_or_comment" else "mean")


def test_string_or_comment_labels_follow_pythons_tokenizer():
    source = 'x = 1  # a comment\ndef f():\n    """doc words"""\n    return "s" + y\n'
    spans = string_or_comment_spans(source)
    positions = labelled_positions(source, spans)

    def words(label: str) -> list[str]:
        out = []
        for end in positions[label]:
            start = end
            while start > 0 and (source[start - 1].isalnum() or source[start - 1] == "_"):
                start -= 1
            out.append(source[start:end])
        return out

    assert words("string_or_comment") == ["a", "comment", "doc", "words", "s"]
    assert words("code") == ["x", "1", "def", "f", "return", "y"]


def test_user_task_multiclass_one_vs_rest(word_tokenizer, tmp_path, one_thread):
    rows = [
        {"sentence": f"w{10 * c + i % 10} w{i % 7}", "topic": c}
        for c in range(3)
        for i in range(60)
    ]
    rows += [{"sentence": "w5 w5", "topic": 0}] * 3  # duplicates: kept once
    path = write_jsonl(tmp_path / "topics.jsonl", rows)
    spec = {"path": str(path), "text_column": "sentence", "label_column": "topic"}
    data = build_task(spec, TaskSizes(20, 0.25, 16, seed=0))
    assert data.name == "topics" and data.classes == ["0", "1", "2"]
    assert {len(v) for v in data.train.values()} == {15}
    assert {len(v) for v in data.test.values()} == {5}
    train = [t for v in data.train.values() for t in v]
    test = [t for v in data.test.values() for t in v]
    assert len(set(train)) == len(train) and not set(train) & set(test)

    csv = tmp_path / "topics.csv"
    csv.write_text("sentence,topic\n" + "".join(f"{r['sentence']},{r['topic']}\n" for r in rows))
    ctx = suite_context(
        word_tokenizer, EmbeddingSource(word_tokenizer.get_vocab()), planted_dictionary(), tmp_path
    )
    cfg = SparseProbingConfig(
        tasks=[{**spec, "path": str(csv), "classes": ["0", "1", "2"]}],
        contexts_per_class=20,
        test_fraction=0.25,
        context_length=16,
    )
    result = run_sparse_probing(ctx, cfg)
    per_class = result.saebench["eval_result_unstructured"]["topics_results"]
    assert set(per_class["sae_top_1_test_accuracy"]) == {"0", "1", "2"}  # one probe per class


def test_bad_task_entries_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks\[0\]='stdlib_pkg' is not a task.*stdlib_package"):
        check_sparse_probing(SparseProbingConfig(tasks=["stdlib_pkg"]))
    with pytest.raises(ConfigError, match="needs its own reader"):
        check_sparse_probing(SparseProbingConfig(tasks=["Helsinki-NLP/europarl"]))
    with pytest.raises(ConfigError, match=r"unknown key 'label'.*label_column"):
        check_sparse_probing(SparseProbingConfig(tasks=[{"path": "x.csv", "label": "y"}]))
    with pytest.raises(ConfigError, match="no such file"):
        check_sparse_probing(SparseProbingConfig(tasks=[{"path": str(tmp_path / "none.csv")}]))
    with pytest.raises(ConfigError, match="test_fraction=1.5"):
        check_sparse_probing(SparseProbingConfig(test_fraction=1.5))
    # Hub tasks are refused before anything loads when the hub is off (as in every test).
    with pytest.raises(ConfigError, match=r"tasks\[1\]='fancyzhx/ag_news'.*HF_HUB_OFFLINE"):
        check_sparse_probing(SparseProbingConfig(tasks=["stdlib_package", "fancyzhx/ag_news"]))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check_sparse_probing(SparseProbingConfig(tasks=[{"path": "someone/dataset"}]))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        build_task("fancyzhx/ag_news", SIZES)


def test_a_python_without_its_test_suite_leaves_the_task_out(
    tmp_path, word_tokenizer, monkeypatch, one_thread
):
    from saetrain.evaluation.usefulness import probing_tasks

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mod.py").write_text("x = 1\n" * 200)
    monkeypatch.setattr(probing_tasks, "stdlib_dir", lambda: tmp_path / "lib")
    ctx = suite_context(
        word_tokenizer, EmbeddingSource(word_tokenizer.get_vocab()), planted_dictionary(), tmp_path
    )
    data = write_jsonl(tmp_path / "planted.jsonl", planted_rows(20))
    cfg = SparseProbingConfig(
        tasks=["stdlib_test_module", {"path": str(data)}], contexts_per_class=20, context_length=32
    )
    result = run_sparse_probing(ctx, cfg)
    assert any(n.startswith("left out: stdlib_test_module") for n in result.notes)
    assert result.saebench["eval_config"]["dataset_names"] == ["planted"]


def test_hydra_config_takes_a_user_task(tmp_path):
    from saetrain.api import config_from_overrides

    path = write_jsonl(tmp_path / "t.jsonl", planted_rows(3))
    cfg = config_from_overrides(
        [f"eval.sparse_probing.tasks=[stdlib_package,{{path:{path},label_column:label}}]"]
    )
    assert cfg.eval.sparse_probing.tasks[1] == {"path": str(path), "label_column": "label"}
    with pytest.raises(ConfigError, match="k_values"):
        config_from_overrides(["eval.sparse_probing.k_values=[0]"])


SAEBENCH_LLM_KEYS = {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_2_test_accuracy"}
SAEBENCH_SAE_KEYS = {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"}


def test_real_model_run_and_saebench_layout(tmp_path, one_thread):
    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource

    model, tokenizer = load_lm(ModelConfig(), torch.device("cpu"))
    site = "resid_post.2"
    torch.manual_seed(0)
    sae = build_dictionary(
        DictionaryConfig(architecture="topk", k=8, n_latents=256), 576, 576, torch.device("cpu")
    )
    ctx = SuiteContext(
        model, tokenizer, sae, ActivationSource(model, [site]), [site], "SmolLM2-135M-Instruct",
        "random-topk", torch.device("cpu"), 0, tmp_path,
    )  # fmt: skip
    cfg = SparseProbingConfig(
        contexts_per_class=8, test_fraction=0.25, context_length=32, k_values=[1, 2]
    )
    result = run_sparse_probing(ctx, cfg)
    out = result.saebench
    assert out["eval_type_id"] == "sparse_probing"
    assert set(out) >= {
        "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
        "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id",
        "sae_lens_version", "sae_cfg_dict", "eval_result_unstructured",
    }  # fmt: skip
    assert set(out["eval_result_metrics"]["llm"]) == SAEBENCH_LLM_KEYS
    assert set(out["eval_result_metrics"]["sae"]) == SAEBENCH_SAE_KEYS
    assert out["eval_result_metrics"]["sae"]["sae_test_accuracy"] is None  # not asked for
    assert out["eval_config"]["k_values"] == [1, 2]
    assert out["eval_config"]["dataset_names"] == [
        "stdlib_package", "stdlib_test_module", "python_string_or_comment",
    ]  # fmt: skip
    details = out["eval_result_details"]
    assert [d["dataset_name"] for d in details] == [
        "stdlib_package_results", "stdlib_test_module_results",
        "python_string_or_comment_results",
    ]  # fmt: skip
    assert set(details[0]) >= SAEBENCH_LLM_KEYS - {"sae_test_accuracy"}
    json.dumps(out)  # plain JSON
    for key, value in result.metrics.items():
        assert key.startswith("sparse_probing/") and 0.0 <= value <= 1.0
    # Overall numbers are the mean of the tasks'.
    per_task = [d["sae_top_1_test_accuracy"] for d in details]
    assert result.metrics["sparse_probing/sae_top_1_test_accuracy"] == pytest.approx(
        np.mean(per_task)
    )
    # Five one-vs-rest probes for the five packages, one for each two-class task.
    per_class = out["eval_result_unstructured"]
    assert len(per_class["stdlib_package_results"]["llm_test_accuracy"]) == 5
    assert len(per_class["stdlib_test_module_results"]["llm_test_accuracy"]) == 1


def test_missing_scikit_learn_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match=r"pip install 'saetrain\[eval\]'"):
        run_sparse_probing(None, SparseProbingConfig())  # type: ignore[arg-type]
