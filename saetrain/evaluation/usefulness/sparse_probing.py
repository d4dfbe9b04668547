"""Sparse probing: do single latents carry the concepts a dense probe finds in the LM?

Per task (probing_tasks.py) and per class (one vs rest, negatives drawn evenly from the other
classes, as SAEBench does), every context is run through the LM once; its activations at the
dictionary's input site(s) and the dictionary's codes are pooled over the context (the mean over
its ordinary tokens, or the last token's for a token-level task) as the batch goes, so codes are
never kept per token. On the training contexts the k latents (and, for the baseline, the k LM
neurons) whose class means differ most are chosen; a logistic probe (scikit-learn) on them is
scored on the test contexts, beside a dense probe on all the LM's activations.

Pooled codes are kept sparse (CSR, the latents a context fired), so memory is contexts ×
latents fired per context, not contexts × n_latents.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saetrain.config import SparseProbingConfig
from saetrain.dictionaries.base import SparseCodes
from saetrain.errors import ConfigError, TaskUnavailable
from saetrain.evaluation.usefulness import SuiteContext, SuiteResult
from saetrain.evaluation.usefulness.probing_tasks import (
    ProbingDataset,
    TaskSizes,
    build_task,
    task_name,
)
from saetrain.progress import Progress, duration

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

log = logging.getLogger(__name__)

SUITE = "sparse_probing"
# SAEBench caps a text at 8x its context in characters before tokenizing; the same here, so a
# long row costs the tokenizer little.
_CHARS_PER_TOKEN_CAP = 8


def _sklearn():
    """scikit-learn's pieces, imported here: an optional extra (`saetrain[eval]`) that only this
    suite needs, and slow to import."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError(
            "the sparse_probing suite fits its probes with scikit-learn, which is not installed: "
            "pip install 'saetrain[eval]'"
        ) from e
    return LogisticRegression, make_pipeline, StandardScaler, ConvergenceWarning


@dataclass
class PooledFeatures:
    """Per context: the LM's pooled activations (dense) and the dictionary's pooled codes."""

    lm: np.ndarray  # [contexts, d] float32
    codes: csr_matrix  # [contexts, n_latents] float32


# -- tokens and pooling --------------------------------------------------------------------------


def _bos_id(tokenizer: Any) -> int | None:
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def tokenize_contexts(
    tokenizer: Any, texts: list[str], context_length: int, keep_end: bool
) -> list[list[int]]:
    """Token ids per text: BOS, then the text cut to fill `context_length` (its start kept, or
    its end for a token-level task)."""
    cap = _CHARS_PER_TOKEN_CAP * context_length
    texts = [t[-cap:] if keep_end else t[:cap] for t in texts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = _bos_id(tokenizer)
    body = context_length - (1 if bos is not None else 0)
    out = []
    for ids in encoded:
        ids = ids[-body:] if keep_end else ids[:body]
        out.append(([bos] if bos is not None else []) + list(ids))
    return out


def _batch(
    ids: list[list[int]], tokenizer: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] right-padded and the mask of ordinary tokens (not special, not pad)."""
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _bos_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad or 0, dtype=torch.long)
    present = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        present[row, : len(seq)] = True
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    mask = present & ~torch.isin(input_ids, special)
    return input_ids.to(device), mask.to(device)


def pool_codes(
    codes: SparseCodes | torch.Tensor,
    context_of_row: torch.Tensor,
    tokens_per_context: torch.Tensor,
    n_latents: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each context's codes summed and divided by its token count, sparse: (context, latent,
    value) of every nonzero entry. Rows of `codes` belong to contexts `context_of_row`; a
    context's rows may come in several calls (their entries add up). No [contexts, n_latents]
    is formed."""
    if isinstance(codes, SparseCodes):
        rows = context_of_row[:, None].expand_as(codes.indices).reshape(-1)
        cols, vals = codes.indices.reshape(-1), codes.values.reshape(-1)
    else:
        nz = codes.nonzero(as_tuple=True)
        rows, cols, vals = context_of_row[nz[0]], nz[1], codes[nz]
    keep = vals != 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep].float()
    keys, inverse = torch.unique(rows * n_latents + cols, return_inverse=True)
    sums = torch.zeros(keys.shape[0], dtype=torch.float32, device=vals.device)
    sums.index_add_(0, inverse, vals)
    ctx_rows = keys // n_latents
    return ctx_rows, keys % n_latents, sums / tokens_per_context[ctx_rows].float()


# Rows encoded at once: an encoder's dense pre-activations are rows × n_latents floats, kept
# under 2^25 (128 MiB in float32) however wide the dictionary.
_ENCODE_FLOATS = 2**25


@torch.no_grad()
def pooled_features(
    ctx: SuiteContext, texts: list[str], pooling: str, cfg: SparseProbingConfig, label: str
) -> PooledFeatures:
    """Run every text through the LM and the dictionary, pooling as each batch goes."""
    from scipy.sparse import csr_matrix  # optional: scikit-learn's own dependency (saetrain[eval])

    dictionary = ctx.dictionary
    n_latents = int(dictionary.n_latents)
    dtype = dictionary.W_enc.dtype
    last = pooling == "last"
    ids = tokenize_contexts(ctx.tokenizer, texts, cfg.context_length, keep_end=last)
    lm_parts: list[np.ndarray] = []
    coo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with Progress(f"sparse probing {label}", len(ids), "contexts") as progress:
        for start in range(0, len(ids), cfg.batch_contexts):
            chunk = ids[start : start + cfg.batch_contexts]
            input_ids, mask = _batch(chunk, ctx.tokenizer, ctx.device)
            acts = ctx.source(input_ids)
            x = torch.cat([acts[s] for s in ctx.input_sites], dim=-1).float()
            if not mask.any(dim=1).all():
                raise ConfigError(
                    f"sparse probing {label}: the tokenizer turns a text into special tokens only "
                    "(e.g. its unknown token): no position of it can be pooled"
                )
            if last:  # the last ordinary token of each context
                positions = torch.arange(mask.shape[1], device=mask.device)
                at = (mask * (positions + 1)).argmax(dim=1)
                rows = x[torch.arange(len(chunk), device=x.device), at]
                context_of_row = torch.arange(len(chunk), device=x.device)
                lm = rows
            else:
                rows = x[mask]
                context_of_row = mask.nonzero(as_tuple=True)[0]
                weights = mask.float() / mask.sum(dim=1, keepdim=True)
                lm = torch.einsum("bt,btd->bd", weights, x)
            where = dictionary.W_enc.device
            tokens = torch.bincount(context_of_row, minlength=len(chunk)).to(where)
            context_of_row = context_of_row.to(where)
            step = max(1, _ENCODE_FLOATS // n_latents)
            for i in range(0, rows.shape[0], step):
                codes = dictionary.encode(rows[i : i + step].to(device=where, dtype=dtype))
                r, c, v = pool_codes(codes, context_of_row[i : i + step], tokens, n_latents)
                coo.append(((r + start).cpu().numpy(), c.cpu().numpy(), v.cpu().numpy()))
            lm_parts.append(lm.cpu().numpy().astype(np.float32))
            progress.update(len(chunk))
    r, c, v = (np.concatenate(parts) for parts in zip(*coo, strict=True))
    # Entries of one (context, latent) from several encode steps add up in the conversion.
    codes_csr = csr_matrix((v, (r, c)), shape=(len(ids), n_latents), dtype=np.float32)
    return PooledFeatures(lm=np.concatenate(lm_parts), codes=codes_csr)


# -- probes --------------------------------------------------------------------------------------


def top_k_by_mean_difference(features: Any, labels: np.ndarray, k: int) -> np.ndarray:
    """The k columns whose means differ most between label 1 and label 0 (|difference|;
    ties: the lower column). `features` is dense or CSR."""
    pos = np.asarray(features[labels == 1].mean(axis=0)).ravel()
    neg = np.asarray(features[labels == 0].mean(axis=0)).ravel()
    return np.argsort(-np.abs(pos - neg), kind="stable")[:k]


class ProbeFitter:
    """Logistic probes (scikit-learn, L2, C = 1 as SAEBench) on standardised features; counts
    the fits that did not converge."""

    def __init__(self) -> None:
        self._logistic, self._pipeline, self._scaler, self._warning = _sklearn()
        self.fits = 0
        self.not_converged = 0

    def accuracy(self, x_train: Any, y_train: np.ndarray, x_test: Any, y_test: np.ndarray) -> float:
        sparse = hasattr(x_train, "tocsr")
        probe = self._pipeline(
            self._scaler(with_mean=not sparse), self._logistic(C=1.0, max_iter=1000)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", self._warning)
            probe.fit(x_train, y_train)
        self.fits += 1
        self.not_converged += any(issubclass(w.category, self._warning) for w in caught)
        return float((probe.predict(x_test) == y_test).mean())


def binary_split(
    classes: np.ndarray, positive: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of a one-vs-rest task: every context of `positive` and as many
    negatives, drawn evenly from the other classes (SAEBench's recipe)."""
    pos = np.flatnonzero(classes == positive)
    others = [np.flatnonzero(classes == c) for c in np.unique(classes) if c != positive]
    per_class = -(-len(pos) // len(others))
    drawn = np.concatenate([rng.permutation(o)[:per_class] for o in others])
    neg = rng.permutation(drawn)[: len(pos)]
    index = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), np.int64)])
    order = rng.permutation(len(index))
    return index[order], labels[order]


def probe_class(
    train: PooledFeatures,
    test: PooledFeatures,
    train_split: tuple[np.ndarray, np.ndarray],
    test_split: tuple[np.ndarray, np.ndarray],
    k_values: list[int],
    fitter: ProbeFitter,
    probe_all_latents: bool,
) -> tuple[dict[str, float], list[int]]:
    """Test accuracies of one binary task (SAEBench's keys), and its top latents."""
    (i_tr, y_tr), (i_te, y_te) = train_split, test_split
    lm_tr, lm_te = train.lm[i_tr], test.lm[i_te]
    codes_tr, codes_te = train.codes[i_tr], test.codes[i_te]
    out = {"llm_test_accuracy": fitter.accuracy(lm_tr, y_tr, lm_te, y_te)}
    if probe_all_latents:
        out["sae_test_accuracy"] = fitter.accuracy(codes_tr, y_tr, codes_te, y_te)
    d, n = lm_tr.shape[1], codes_tr.shape[1]
    # k beyond the width is left out (the caller notes it): the whole width is the dense probe.
    neurons = top_k_by_mean_difference(lm_tr, y_tr, max(k_values))
    latents = top_k_by_mean_difference(codes_tr, y_tr, max(k_values))
    for k in k_values:
        if k <= d:
            top = neurons[:k]
            out[f"llm_top_{k}_test_accuracy"] = fitter.accuracy(
                lm_tr[:, top], y_tr, lm_te[:, top], y_te
            )
        if k <= n:
            top = latents[:k]
            out[f"sae_top_{k}_test_accuracy"] = fitter.accuracy(
                codes_tr[:, top].toarray(), y_tr, codes_te[:, top].toarray(), y_te
            )
    return out, [int(i) for i in latents]


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


@dataclass
class TaskResult:
    """One task's accuracies: the mean over its binary tasks, and each of them."""

    name: str
    means: dict[str, float]
    per_class: dict[str, dict[str, float]]
    top_latents: dict[str, list[int]]
    n_train: int
    n_test: int
    pooling: str


def run_task(
    ctx: SuiteContext,
    data: ProbingDataset,
    cfg: SparseProbingConfig,
    fitter: ProbeFitter,
    seed: int,
) -> TaskResult:
    """Pool every context of a task, then probe each class against the rest."""
    classes = data.classes
    train_texts = [t for c in classes for t in data.train[c]]
    test_texts = [t for c in classes for t in data.test[c]]
    train_class = np.repeat(np.arange(len(classes)), [len(data.train[c]) for c in classes])
    test_class = np.repeat(np.arange(len(classes)), [len(data.test[c]) for c in classes])
    pooled = pooled_features(ctx, train_texts + test_texts, data.pooling, cfg, data.name)
    n = len(train_texts)
    train = PooledFeatures(pooled.lm[:n], pooled.codes[:n])
    test = PooledFeatures(pooled.lm[n:], pooled.codes[n:])
    # Two classes are one binary task (the second class's probe would mirror the first's).
    positives = classes[:1] if len(classes) == 2 else classes
    per_class: dict[str, dict[str, float]] = {}
    top_latents: dict[str, list[int]] = {}
    for i, c in enumerate(positives):
        rng = np.random.default_rng([seed, i])
        per_class[c], top_latents[c] = probe_class(
            train,
            test,
            binary_split(train_class, i, rng),
            binary_split(test_class, i, rng),
            list(cfg.k_values),
            fitter,
            cfg.probe_all_latents,
        )
    keys = list(next(iter(per_class.values())))
    means = {key: _mean([r[key] for r in per_class.values()]) for key in keys}
    return TaskResult(
        data.name,
        means,
        per_class,
        top_latents,
        len(data.train[classes[0]]),
        len(data.test[classes[0]]),
        data.pooling,
    )


# -- the suite -----------------------------------------------------------------------------------


def run_sparse_probing(ctx: SuiteContext, cfg: SparseProbingConfig) -> SuiteResult:
    """Sparse probing on every task of `cfg.tasks`; SAEBench's result layout in `saebench`."""
    started = time.monotonic()
    fitter = ProbeFitter()  # scikit-learn missing: the error names the extra, before any work
    seed = ctx.seed if cfg.seed is None else cfg.seed
    sizes = TaskSizes(cfg.contexts_per_class, cfg.test_fraction, cfg.context_length, seed)
    notes: list[str] = []
    d = sum(ctx.source.width(site) for site in ctx.input_sites)
    for k in cfg.k_values:
        for what, width in (("LM neurons", d), ("latents", int(ctx.dictionary.n_latents))):
            if k > width:
                notes.append(f"k={k} exceeds the {width} {what}: no top-{k} probe on them")
    results: list[TaskResult] = []
    for entry in cfg.tasks:
        try:
            data = build_task(entry, sizes)
        except TaskUnavailable as e:  # a built-in task this machine cannot make
            notes.append(f"left out: {e}")
            continue
        notes.extend(data.notes)
        results.append(run_task(ctx, data, cfg, fitter, seed))
        _log_task(results[-1], cfg.k_values)
    if fitter.not_converged:
        notes.append(
            f"{fitter.not_converged} of {fitter.fits} probes stopped at scikit-learn's "
            "max_iter=1000 before converging"
        )
    if not results:
        raise ConfigError(f"sparse probing: no task could be made ({'; '.join(notes)})")
    keys = list(results[0].means)
    overall = {key: _mean([r.means[key] for r in results if key in r.means]) for key in keys}
    metrics = {f"{SUITE}/{key}": value for key, value in overall.items()}
    for r in results:
        metrics.update({f"{SUITE}/{r.name}/{key}": v for key, v in r.means.items()})
    elapsed = time.monotonic() - started
    log.info("sparse probing: %d tasks in %s", len(results), duration(elapsed))
    for note in notes:
        log.warning("sparse probing: %s", note)
    return SuiteResult(
        metrics=metrics,
        saebench=saebench_output(ctx, cfg, seed, results, overall),
        notes=notes,
    )


def _log_task(r: TaskResult, k_values: list[int]) -> None:
    m = r.means
    sae = " ".join(
        f"k{k} {m[f'sae_top_{k}_test_accuracy']:.3f}"
        for k in k_values
        if f"sae_top_{k}_test_accuracy" in m
    )
    neurons = " ".join(
        f"k{k} {m[f'llm_top_{k}_test_accuracy']:.3f}"
        for k in k_values
        if f"llm_top_{k}_test_accuracy" in m
    )
    log.info(
        "sparse probing %s (%d binary tasks, %d/%d contexts per class): dense %.3f | "
        "top neurons %s | latents %s",
        r.name,
        len(r.per_class),
        r.n_train,
        r.n_test,
        m["llm_test_accuracy"],
        neurons,
        sae,
    )


def _saetrain_version() -> str:
    try:
        return version("saetrain")
    except PackageNotFoundError:
        return "unknown"


def saebench_output(
    ctx: SuiteContext,
    cfg: SparseProbingConfig,
    seed: int,
    results: list[TaskResult],
    overall: dict[str, float],
) -> dict[str, Any]:
    """The result in SAEBench's sparse_probing layout (SparseProbingEvalOutput's fields and
    keys); saetrain's own settings are added to eval_config under their own names."""
    llm = {key: v for key, v in overall.items() if key.startswith("llm_")}
    sae = {key: v for key, v in overall.items() if key.startswith("sae_")}
    sae.setdefault("sae_test_accuracy", None)
    sizes = TaskSizes(cfg.contexts_per_class, cfg.test_fraction, cfg.context_length, seed)
    dictionary = ctx.dictionary
    return {
        "eval_type_id": SUITE,
        "eval_config": {
            "random_seed": seed,
            "dataset_names": [r.name for r in results],
            # One binary task's contexts: positives and as many negatives.
            "probe_train_set_size": 2 * sizes.n_train,
            "probe_test_set_size": 2 * sizes.n_test,
            "context_length": cfg.context_length,
            "sae_batch_size": cfg.batch_contexts,
            "llm_batch_size": cfg.batch_contexts,
            "llm_dtype": str(next(ctx.model.parameters()).dtype).removeprefix("torch."),
            "model_name": ctx.model_name,
            "k_values": list(cfg.k_values),
            "lower_vram_usage": False,
            "saetrain": {
                **{k: v for k, v in asdict(cfg).items() if k != "tasks"},
                "tasks": [task_name(t) for t in cfg.tasks],
            },
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {"llm": llm, "sae": sae},
        "eval_result_details": [
            {
                "dataset_name": f"{r.name}_results",
                **r.means,
                "pooling": r.pooling,
                "train_contexts_per_class": r.n_train,
                "test_contexts_per_class": r.n_test,
            }
            for r in results
        ],
        # Not a SAEBench run: the software that computed it, where SAEBench names its commit.
        "sae_bench_commit_hash": f"saetrain {_saetrain_version()}",
        "sae_lens_id": ctx.sae_name,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": {
            "architecture": dictionary.saelens_architecture(),
            "d_in": int(dictionary.d_in),
            "d_sae": int(dictionary.n_latents),
            "hook_names": list(ctx.input_sites),
            "model_name": ctx.model_name,
        },
        "eval_result_unstructured": {
            f"{r.name}_results": {
                **{key: {c: res[key] for c, res in r.per_class.items()} for key in r.means},
                "top_latents": r.top_latents,
            }
            for r in results
        },
    }
