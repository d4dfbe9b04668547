"""Labelled texts for sparse probing: the built-in offline tasks and the user's / SAEBench's.

A task is a `ProbingDataset`: texts per class, split into train and test so that no source
(a file of the standard library, a row of a dataset) gives contexts to both. The probes
(sparse_probing.py) make each class a one-vs-rest binary task.

Built-in tasks read this interpreter's standard library, which every machine with Python has:
  stdlib_package            which top-level package a chunk of source comes from (5 classes)
  stdlib_test_module        a test module (test_*.py) or a library module
  python_string_or_comment  is the last token inside a string literal or a comment, or in code
                            (token level: probed on the last token's codes, not a mean)
User tasks are a local file (.csv, .json, .jsonl, .parquet) or a hub dataset with a text column
and a label column; SAEBench's sparse-probing datasets are named as SAEBench names them.
"""

from __future__ import annotations

import io
import os
import random
import re
import sysconfig
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saetrain.config import ProbingTaskSpec
from saetrain.errors import ConfigError, TaskUnavailable

# Pooling of a context's codes: the mean over its ordinary tokens, or its last token's.
POOLINGS = ("mean", "last")

BUILTIN_TASKS = ("stdlib_package", "stdlib_test_module", "python_string_or_comment")

# The packages of `stdlib_package`: present in every CPython 3.10+ (Debian ships them too) with
# 200+ kB of source each outside their test folders.
STDLIB_PACKAGES = ("asyncio", "email", "multiprocessing", "unittest", "xml")
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# SAEBench's sparse-probing datasets that are a text column and a label column (its
# dataset_info.chosen_classes_per_dataset): name → the hub dataset and its columns. SAEBench
# additionally balances bias_in_bios and the Amazon categories by gender / rating; these
# loaders do not, so the numbers are comparable in kind, not identical.
SAEBENCH_TASKS: dict[str, dict[str, Any]] = {
    "LabHC/bias_in_bios_class_set1": dict(
        path="LabHC/bias_in_bios", text_column="hard_text", label_column="profession",
        classes=["0", "1", "2", "6", "9"], test_split="test",
    ),
    "LabHC/bias_in_bios_class_set2": dict(
        path="LabHC/bias_in_bios", text_column="hard_text", label_column="profession",
        classes=["11", "13", "14", "18", "19"], test_split="test",
    ),
    "LabHC/bias_in_bios_class_set3": dict(
        path="LabHC/bias_in_bios", text_column="hard_text", label_column="profession",
        classes=["20", "21", "22", "25", "26"], test_split="test",
    ),
    "canrager/amazon_reviews_mcauley_1and5": dict(
        path="canrager/amazon_reviews_mcauley_1and5", text_column="text",
        label_column="category", classes=["1", "2", "3", "5", "6"], test_split="test",
    ),
    "canrager/amazon_reviews_mcauley_1and5_sentiment": dict(
        path="canrager/amazon_reviews_mcauley_1and5", text_column="text",
        label_column="rating", classes=["1.0", "5.0"], test_split="test",
    ),
    "fancyzhx/ag_news": dict(
        path="fancyzhx/ag_news", text_column="text", label_column="label",
        classes=["0", "1", "2", "3"], test_split="test",
    ),
}  # fmt: skip
# SAEBench datasets that need their own readers (a code column with its licence header cut, a
# translation dict per language pair): not provided; a user task over the same data works.
SAEBENCH_UNSUPPORTED = ("codeparrot/github-code", "Helsinki-NLP/europarl")


@dataclass
class ProbingDataset:
    """One task's texts per class, train and test drawn from disjoint sources."""

    name: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    # mean: codes averaged over the context's tokens (SAEBench); last: the final token's codes
    # (token-level tasks: texts are left-truncated so that their end is kept).
    pooling: str = "mean"
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return list(self.train)


@dataclass
class TaskSizes:
    """How many contexts a task draws per class, and how."""

    contexts_per_class: int
    test_fraction: float
    context_length: int
    seed: int

    @property
    def n_test(self) -> int:
        return max(1, round(self.contexts_per_class * self.test_fraction))

    @property
    def n_train(self) -> int:
        return max(1, self.contexts_per_class - self.n_test)

    @property
    def chunk_chars(self) -> int:
        # Source code runs at about 3-4 characters per token: a chunk this long fills a context
        # (the tokenizer truncates the rest).
        return 4 * self.context_length


def task_name(entry: Any) -> str:
    """The name results are filed under: a built-in / SAEBench name, or a user task's."""
    if isinstance(entry, str):
        return entry
    spec = _spec(entry)
    if spec.name:
        return spec.name
    return Path(spec.path).stem if _is_local(spec.path) else spec.path


def check_task_entry(entry: Any, where: str) -> None:
    """Refuse an entry that cannot be a task, naming it and the choices (no data is read)."""
    if isinstance(entry, str):
        if entry in SAEBENCH_UNSUPPORTED:
            raise ConfigError(
                f"{where}={entry!r}: this SAEBench dataset needs its own reader, which saetrain "
                "does not provide; give it as a user task {path, text_column, label_column}"
            )
        if entry not in BUILTIN_TASKS and entry not in SAEBENCH_TASKS:
            raise ConfigError(
                f"{where}={entry!r} is not a task; choose built-in tasks ("
                f"{', '.join(BUILTIN_TASKS)}), SAEBench datasets ({', '.join(SAEBENCH_TASKS)}) "
                "or a user task {path, text_column, label_column, ...}"
            )
        if entry in SAEBENCH_TASKS:
            _check_hub(f"{where}={entry!r}", SAEBENCH_TASKS[entry]["path"])
        return
    spec = _spec(entry, where)
    if not spec.path:
        raise ConfigError(f"{where}.path is empty; give a local file or a hub dataset name")
    if _is_local(spec.path):
        if not Path(spec.path).expanduser().is_file():
            raise ConfigError(f"{where}.path={spec.path!r}: no such file")
    else:
        _check_hub(f"{where}.path={spec.path!r}", spec.path)


def _check_hub(where: str, dataset: str) -> None:
    """A hub dataset cannot be read with HF_HUB_OFFLINE set: say so before anything loads."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off"):
        raise ConfigError(
            f"{where} reads the hub dataset {dataset!r}, but HF_HUB_OFFLINE is set; use the "
            "built-in tasks or a local file"
        )


def build_task(entry: Any, sizes: TaskSizes) -> ProbingDataset:
    """The labelled texts of one `eval.sparse_probing.tasks` entry."""
    if isinstance(entry, str):
        if entry in SAEBENCH_TASKS:
            return _labelled_rows(ProbingTaskSpec(name=entry, **SAEBENCH_TASKS[entry]), sizes)
        builders: dict[str, Callable[[TaskSizes], ProbingDataset]] = {
            "stdlib_package": stdlib_package_task,
            "stdlib_test_module": stdlib_test_module_task,
            "python_string_or_comment": python_string_or_comment_task,
        }
        return builders[entry](sizes)
    spec = _spec(entry)
    return _labelled_rows(spec, sizes, task_name(entry))


# -- the standard library ------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> list[Path]:
    """Every .py file under root outside test folders and installed packages, sorted."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _TEST_DIRS)
        found.extend(Path(folder) / f for f in sorted(files) if f.endswith(".py"))
    return found


def _test_files(root: Path) -> list[Path]:
    """Every test_*.py file of the standard library (its test suite and packages' tests)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
        found.extend(
            Path(folder) / f for f in sorted(files) if f.startswith("test_") and f.endswith(".py")
        )
    return found


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Whole lines gathered into chunks of at least `chunk_chars` characters (the tail, if
    shorter than half a chunk, is dropped): no chunk overlaps another."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            out.append("".join(current))
            current, size = [], 0
    if size >= chunk_chars // 2:
        out.append("".join(current))
    return out


def _fill(
    units: Iterable[dict[str, list[str]]], classes: list[str], n_train: int, n_test: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Sources (each one's examples per class) go whole to the test set until every class has
    `n_test` there, then to the train set until every class has `n_train`: no source gives
    contexts to both."""
    train: dict[str, list[str]] = {c: [] for c in classes}
    test: dict[str, list[str]] = {c: [] for c in classes}
    for unit in units:
        if any(len(test[c]) < n_test for c in classes):
            side = test
        elif any(len(train[c]) < n_train for c in classes):
            side = train
        else:
            break
        for c, examples in unit.items():
            side[c].extend(examples)
    return train, test


def _balanced(
    name: str,
    train: dict[str, list[str]],
    test: dict[str, list[str]],
    sizes: TaskSizes,
    rng: random.Random,
    pooling: str = "mean",
) -> ProbingDataset:
    """Every class cut to the same count (the smallest class's, at most the sizes asked)."""
    n_train = min([sizes.n_train] + [len(v) for v in train.values()])
    n_test = min([sizes.n_test] + [len(v) for v in test.values()])
    notes = []
    if n_train < sizes.n_train or n_test < sizes.n_test:
        notes.append(
            f"{name}: {n_train} train / {n_test} test contexts per class (asked "
            f"{sizes.n_train} / {sizes.n_test}): a class has no more"
        )
    return ProbingDataset(
        name=name,
        train={c: rng.sample(v, n_train) for c, v in train.items()},
        test={c: rng.sample(v, n_test) for c, v in test.items()},
        pooling=pooling,
        notes=notes,
    )


def stdlib_package_task(sizes: TaskSizes, root: Path | None = None) -> ProbingDataset:
    """Which of 5 top-level packages a chunk of source comes from; split by file."""
    root = root or stdlib_dir()
    rng = random.Random(f"stdlib_package/{sizes.seed}")
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for package in STDLIB_PACKAGES:
        files = _python_files(root / package)
        if not files:
            raise ConfigError(f"stdlib_package: {root / package} holds no Python source")
        rng.shuffle(files)
        units = ({package: _chunks(_read(f), sizes.chunk_chars)} for f in files)
        tr, te = _fill(units, [package], sizes.n_train, sizes.n_test)
        train[package], test[package] = tr[package], te[package]
    return _balanced("stdlib_package", train, test, sizes, rng)


# Chunks taken from one file at most, so that a class is many files, not a few long ones.
_CHUNKS_PER_FILE = 4


def stdlib_test_module_task(sizes: TaskSizes, root: Path | None = None) -> ProbingDataset:
    """A chunk of a test module (test_*.py) or of a library module; split by file."""
    root = root or stdlib_dir()
    rng = random.Random(f"stdlib_test_module/{sizes.seed}")
    sources = {"test": _test_files(root), "library": _python_files(root)}
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for label, files in sources.items():
        rng.shuffle(files)

        def units(files: list[Path] = files, label: str = label) -> Iterator[dict[str, list[str]]]:
            for f in files:
                chunks = _chunks(_read(f), sizes.chunk_chars)
                yield {label: rng.sample(chunks, min(len(chunks), _CHUNKS_PER_FILE))}

        tr, te = _fill(units(), [label], sizes.n_train, sizes.n_test)
        train[label], test[label] = tr[label], te[label]
    if min(len(v) for v in test.values()) == 0 or min(len(v) for v in train.values()) == 0:
        raise TaskUnavailable(
            f"stdlib_test_module: the standard library at {root} has too few test_*.py files "
            f"({len(sources['test'])}); this Python was installed without its test suite"
        )
    return _balanced("stdlib_test_module", train, test, sizes, rng)


# Token types whose text is a string literal or a comment (f-string parts on Python 3.12+).
_INSIDE_TYPES = {"STRING", "COMMENT", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"}
_WORD_END = re.compile(r"\w+")
# Positions taken from one file at most, per class.
_POSITIONS_PER_FILE = 4


def string_or_comment_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the string literals and comments of Python source
    (Python's own tokenizer); an error when the source does not tokenize."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    spans = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tokenize.tok_name[tok.type] in _INSIDE_TYPES:
            start = line_starts[tok.start[0] - 1] + tok.start[1]
            end = line_starts[tok.end[0] - 1] + tok.end[1]
            spans.append((start, end))
    return spans


def labelled_positions(text: str, spans: list[tuple[int, int]]) -> dict[str, list[int]]:
    """Ends of words, by whether they lie inside a string / comment span or in code."""
    out: dict[str, list[int]] = {"string_or_comment": [], "code": []}
    ends = [m.end() for m in _WORD_END.finditer(text)]
    i = 0
    for end in ends:  # both sorted: one sweep
        while i < len(spans) and spans[i][1] < end:
            i += 1
        inside = i < len(spans) and spans[i][0] < end <= spans[i][1]
        out["string_or_comment" if inside else "code"].append(end)
    return out


def python_string_or_comment_task(sizes: TaskSizes, root: Path | None = None) -> ProbingDataset:
    """Is the last token of a window of source inside a string literal or a comment? Each
    context is the source before the end of a word; split by file; probed on the last token."""
    root = root or stdlib_dir()
    rng = random.Random(f"python_string_or_comment/{sizes.seed}")
    files = _python_files(root)
    rng.shuffle(files)
    window = sizes.chunk_chars

    def units() -> Iterator[dict[str, list[str]]]:
        for f in files:
            text = _read(f)
            try:
                spans = string_or_comment_spans(text)
            except (tokenize.TokenError, SyntaxError):
                continue  # a file Python's tokenizer refuses (test data): skipped
            unit = {}
            for label, ends in labelled_positions(text, spans).items():
                picked = rng.sample(ends, min(len(ends), _POSITIONS_PER_FILE))
                unit[label] = [text[max(0, p - window) : p] for p in sorted(picked)]
            yield unit

    train, test = _fill(units(), ["string_or_comment", "code"], sizes.n_train, sizes.n_test)
    return _balanced("python_string_or_comment", train, test, sizes, rng, pooling="last")


# -- labelled rows: user files, hub datasets, SAEBench's datasets --------------------------------

_LOCAL_BUILDERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in _LOCAL_BUILDERS or os.path.exists(path)


def _spec(entry: Any, where: str = "eval.sparse_probing.tasks") -> ProbingTaskSpec:
    if isinstance(entry, ProbingTaskSpec):
        return entry
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: {entry!r} is neither a task name nor a mapping")
    valid = {f for f in ProbingTaskSpec.__dataclass_fields__}
    unknown = sorted(set(entry) - valid)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; a user task takes: {', '.join(sorted(valid))}"
        )
    return ProbingTaskSpec(**entry)


def _open_rows(spec: ProbingTaskSpec, split: str, name: str):
    """A `datasets` table of the split (a local file's rows are its 'train' split)."""
    import datasets  # imported here: the suite's start-up stays cheap

    try:
        if _is_local(spec.path):
            path = Path(spec.path).expanduser()
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"task {name!r}: {spec.path!r} is not a .csv, .json, .jsonl or .parquet file"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        _check_hub(f"task {name!r}", spec.path)
        return datasets.load_dataset(spec.path, spec.config_name, split=split)
    except ConfigError:
        raise
    except Exception as e:  # the hub unreachable, a split that is not there, a corrupt file
        raise ConfigError(
            f"task {name!r}: {spec.path!r} (split {split!r}) cannot be read: {e}"
        ) from None


def _texts_by_class(
    rows, spec: ProbingTaskSpec, name: str, rng: random.Random, per_class: int
) -> dict[str, list[str]]:
    for column in (spec.text_column, spec.label_column):
        if column not in rows.column_names:
            raise ConfigError(
                f"task {name!r}: {spec.path!r} has no column {column!r}; columns are: "
                f"{', '.join(rows.column_names)}"
            )
    labels = [str(v) for v in rows[spec.label_column]]
    wanted = list(spec.classes) if spec.classes else sorted(set(labels))
    by_class: dict[str, list[int]] = {str(c): [] for c in wanted}
    for i, label in enumerate(labels):
        if label in by_class:
            by_class[label].append(i)
    out: dict[str, list[str]] = {}
    for label, indices in by_class.items():
        rng.shuffle(indices)
        texts = []
        seen: set[str] = set()
        for i in indices:  # drawn in a seeded order; duplicate texts kept once
            text = rows[i][spec.text_column]
            if isinstance(text, str) and text and text not in seen:
                seen.add(text)
                texts.append(text)
                if len(texts) == per_class:
                    break
        out[label] = texts
    empty = [c for c, v in out.items() if not v]
    if empty:
        raise ConfigError(
            f"task {name!r}: no rows of class {empty[0]!r} in {spec.path!r} (column "
            f"{spec.label_column!r} holds: {', '.join(sorted(set(labels))[:20])})"
        )
    if len(out) < 2:
        raise ConfigError(f"task {name!r}: {spec.path!r} has one class only; a probe needs two")
    return out


def _labelled_rows(spec: ProbingTaskSpec, sizes: TaskSizes, name: str | None = None):
    """A task from rows with a text and a label: each row one context (its text truncated)."""
    name = name or spec.name or spec.path
    rng = random.Random(f"{name}/{sizes.seed}")
    rows = _open_rows(spec, spec.split, name)
    if spec.test_split is not None:
        train = _texts_by_class(rows, spec, name, rng, sizes.n_train)
        test_rows = _open_rows(spec, spec.test_split, name)
        test = _texts_by_class(test_rows, spec, name, rng, sizes.n_test)
        held = {t for texts in test.values() for t in texts}
        for c in train:  # a text in both splits is kept in the test set only
            train[c] = [t for t in train[c] if t not in held]
    else:
        both = _texts_by_class(rows, spec, name, rng, sizes.n_train + sizes.n_test)
        # Texts are distinct across classes too (a text with two labels goes to the first).
        owner: dict[str, str] = {}
        for c, texts in both.items():
            both[c] = [t for t in texts if owner.setdefault(t, c) == c]
        test = {c: v[: sizes.n_test] for c, v in both.items()}
        train = {c: v[sizes.n_test :] for c, v in both.items()}
    return _balanced(name, train, test, sizes, rng)
