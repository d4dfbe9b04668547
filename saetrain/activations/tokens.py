"""Text documents in, fixed-length token contexts out.

Documents come from HF `datasets` (streaming), are split into training and held-out documents by a
hash of their text (so no held-out document is ever trained on, whatever the order or the epoch),
tokenized (or taken as token ids from an already-tokenized dataset, after a check that the model's
tokenizer made them), joined with a separator token and cut into contexts that start with BOS —
or one document per context, padded. A mask marks
the positions that hold special tokens (BOS, the separator, ...): they are excluded from training
and from every metric.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from saetrain.config import DataConfig
from saetrain.distributed.sharding import rank_items
from saetrain.errors import ConfigError

log = logging.getLogger(__name__)

# Local builders of HF datasets whose `data_files` are paths on this machine.
LOCAL_BUILDERS = ("text", "json", "csv", "parquet")


@dataclass
class TokenBatch:
    """Contexts of token ids and which of their positions count."""

    input_ids: torch.Tensor  # [batch, context] int64
    mask: torch.Tensor  # [batch, context] bool: False where the token is special (BOS, separator)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def expand_data_files(patterns: list[str]) -> list[str]:
    """Expand globs; a pattern that matches nothing is an error naming it."""
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"data.data_files: {pattern!r} matches no file")
        files.extend(matches)
    return files


# A document: its text, or its token ids when the dataset is already tokenized.
Document = str | list[int]
TOKEN_COLUMNS = ("input_ids", "tokens")


def is_held_out(doc: Document, percent: float) -> bool:
    """Whether a document belongs to the held-out split (a stable hash of its text or ids)."""
    if isinstance(doc, str):
        data = doc.encode("utf-8", "replace")
    else:
        data = b"".join(int(i).to_bytes(4, "little", signed=True) for i in doc)
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10_000 < percent * 100


def _document_column(cfg: DataConfig, row: dict) -> tuple[str, bool]:
    """(column, is_tokenized) of a dataset's rows; a clear error when none fits."""
    if cfg.token_column is not None:
        if cfg.token_column not in row:
            raise ConfigError(
                f"data.token_column={cfg.token_column!r} is not a column of {cfg.path!r}; "
                f"columns are: {', '.join(row)}"
            )
        return cfg.token_column, True
    if cfg.text_column in row:
        return cfg.text_column, False
    for name in TOKEN_COLUMNS:
        if name in row:
            return name, True
    raise ConfigError(
        f"data.text_column={cfg.text_column!r} is not a column of {cfg.path!r} (nor a token "
        f"column {' or '.join(TOKEN_COLUMNS)}); columns are: {', '.join(row)}"
    )


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def open_dataset(cfg: DataConfig, streaming: bool | None = None):
    """`datasets.load_dataset` for `cfg`; what it cannot find is a ConfigError naming the field
    (data.path, data.name, data.split) instead of a datasets traceback."""
    from datasets import load_dataset  # here: datasets takes over a second to import

    if cfg.path not in LOCAL_BUILDERS and cfg.path.startswith(("/", ".", "~")):
        if not os.path.exists(os.path.expanduser(cfg.path)):
            raise ConfigError(
                f"data.path={cfg.path!r}: no such folder or file. data.path is a builder "
                f"({', '.join(LOCAL_BUILDERS)}) reading data.data_files, a local dataset folder, "
                "or a hub dataset name"
            )
    kwargs: dict = {
        "split": cfg.split,
        "streaming": cfg.streaming if streaming is None else streaming,
    }
    if cfg.path in LOCAL_BUILDERS:
        kwargs["data_files"] = expand_data_files(list(cfg.data_files))
        if cfg.path == "text":
            kwargs["sample_by"] = cfg.sample_by
    elif cfg.data_files:
        kwargs["data_files"] = list(cfg.data_files)
    where = "a local folder" if _looks_local(cfg.path) else "a hub dataset"
    try:
        return load_dataset(cfg.path, cfg.name, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(f"data.path={cfg.path!r} ({where}) could not be read: {e}") from None
    except ValueError as e:
        text = str(e)
        if "split" in text.lower():
            raise ConfigError(
                f"data.split={cfg.split!r} is not valid for {cfg.path!r}: {text}"
            ) from None
        if cfg.name is not None and ("config" in text.lower() or cfg.name in text):
            raise ConfigError(
                f"data.name={cfg.name!r} is not valid for {cfg.path!r}: {text}"
            ) from None
        raise ConfigError(f"data.path={cfg.path!r} ({where}) could not be read: {text}") from None
    except ConnectionError as e:
        raise ConfigError(
            f"data.path={cfg.path!r} ({where}) could not be reached (offline?): {e}"
        ) from None


def check_dataset(cfg: DataConfig) -> None:
    """Open the dataset and read its first row, so that a missing path, split or column fails in
    seconds, before the LM loads (streamed: nothing is materialised)."""
    ds = open_dataset(cfg, streaming=True)
    try:
        row = next(iter(ds))
    except StopIteration:
        raise ConfigError(f"data.path={cfg.path!r}: the dataset has no rows") from None
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ConfigError(f"data.path={cfg.path!r}: its first row cannot be read: {e}") from None
    _document_column(cfg, row)


def iter_documents(cfg: DataConfig, seed: int, epoch: int = 0) -> Iterator[Document]:
    """One pass over the dataset's documents, shuffled with (seed, epoch)."""
    ds = open_dataset(cfg)
    if cfg.shuffle_buffer > 0:
        if cfg.streaming:
            ds = ds.shuffle(seed=seed + epoch, buffer_size=cfg.shuffle_buffer)
        else:
            ds = ds.shuffle(seed=seed + epoch)
    column: str | None = None
    tokenized = False
    for row in ds:
        if column is None:
            column, tokenized = _document_column(cfg, row)
        doc = row[column]
        if tokenized:
            doc = [int(i) for i in doc]
        if doc:
            yield doc


def check_token_ids(ids: list[int], tokenizer, where: str = "data") -> None:
    """Refuse token ids that were not made by `tokenizer`: ids beyond its vocabulary, or text
    that does not re-encode to (nearly) the same ids."""
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConfigError(
            f"{where}: the dataset's token ids include {bad[0]}, outside the model's tokenizer "
            f"(vocabulary of {vocab}); it was tokenized for another model"
        )
    special = set(tokenizer.all_special_ids)
    sample = [i for i in ids if i not in special][:64]
    if len(sample) < 8:
        return
    again = tokenizer(tokenizer.decode(sample), add_special_tokens=False)["input_ids"]
    n = min(len(sample), len(again)) - 1  # the last token may merge differently when cut
    agree = sum(a == b for a, b in zip(sample[:n], again[:n], strict=True)) / max(n, 1)
    if agree < 0.9:
        raise ConfigError(
            f"{where}: the dataset's token ids do not match the model's tokenizer (decoding and "
            f"re-encoding agrees on {agree:.0%} of tokens); tokenize with the model's tokenizer "
            "or use the text column"
        )


class ContextPacker:
    """Packs tokenized documents into contexts of `context_size` tokens.

    Each context is [BOS] + the next `context_size - 1` tokens of the document stream (or the next
    `context_size` tokens without BOS); documents are separated by the EOS token so the model sees
    where one ends.
    """

    def __init__(
        self,
        tokenizer,
        context_size: int,
        prepend_bos: bool,
        tokenize_batch: int = 32,
        packing: str = "concat",
    ):
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.prepend_bos = prepend_bos
        self.tokenize_batch = tokenize_batch
        self.packing = packing
        self._checked = False
        bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        if bos is None:
            bos = eos
        if prepend_bos and bos is None:
            raise ConfigError(
                "data.prepend_bos=true but the tokenizer has neither a BOS nor an EOS token; "
                "set data.prepend_bos=false"
            )
        self.bos_id = bos
        self.separator_id = eos if eos is not None else bos
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.separator_id
        if packing == "document" and self.pad_id is None:
            raise ConfigError(
                "data.packing=document pads short documents with a special token, but the "
                "tokenizer has no pad, EOS or BOS token; use data.packing=concat"
            )
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def _encode(self, batch: list[Document]) -> list[list[int]]:
        """Token ids of each document: text is tokenized, ids are checked once and kept."""
        texts = [d for d in batch if isinstance(d, str)]
        encoded = iter(
            self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        )
        out: list[list[int]] = []
        for doc in batch:
            if isinstance(doc, str):
                out.append(next(encoded))
                continue
            if not self._checked:
                check_token_ids(doc, self.tokenizer)
                self._checked = True
            if self.prepend_bos and doc and doc[0] == self.bos_id:
                doc = doc[1:]  # pre-tokenized with BOS already: the packer adds its own
            out.append(doc)
        return out

    def _one_per_context(self, ids: list[int], body: int) -> torch.Tensor:
        chunk = ids[:body]
        chunk = chunk + [self.pad_id] * (body - len(chunk))
        if self.prepend_bos:
            chunk = [self.bos_id, *chunk]
        return torch.tensor(chunk, dtype=torch.long)

    def contexts(self, documents: Iterable[Document]) -> Iterator[torch.Tensor]:
        """Yield 1-D int64 tensors of length context_size."""
        body = self.context_size - 1 if self.prepend_bos else self.context_size
        pending: list[int] = []
        batch: list[Document] = []

        def drain() -> Iterator[torch.Tensor]:
            encoded = self._encode(batch)
            if self.packing == "document":
                for ids in encoded:
                    if ids:
                        yield self._one_per_context(ids, body)
                return
            for ids in encoded:
                pending.extend(ids)
                if self.separator_id is not None:
                    pending.append(self.separator_id)
            start = 0
            while len(pending) - start >= body:
                chunk = pending[start : start + body]
                start += body
                if self.prepend_bos:
                    chunk = [self.bos_id, *chunk]
                yield torch.tensor(chunk, dtype=torch.long)
            del pending[:start]

        for doc in documents:
            batch.append(doc)
            if len(batch) == self.tokenize_batch:
                yield from drain()
                batch.clear()
        if batch:
            yield from drain()

    def mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True at positions that hold an ordinary (non-special) token."""
        return ~torch.isin(input_ids, self.special_ids.to(input_ids.device))


def batched(contexts: Iterator[torch.Tensor], batch_size: int, packer: ContextPacker):
    """Group contexts into TokenBatches; the last one may be smaller."""
    rows: list[torch.Tensor] = []
    for ctx in contexts:
        rows.append(ctx)
        if len(rows) == batch_size:
            ids = torch.stack(rows)
            yield TokenBatch(ids, packer.mask(ids))
            rows = []
    if rows:
        ids = torch.stack(rows)
        yield TokenBatch(ids, packer.mask(ids))


class TokenSource:
    """Training and held-out contexts from one dataset config.

    Training contexts repeat the dataset in new shuffled epochs when it runs out (logged); an empty
    dataset, or one whose training split yields no full context, is an error.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.seed = seed
        # Under torchrun each rank trains on its own share of the contexts (every world_size-th,
        # from its rank: saetrain.distributed.sharding.rank_items); one process takes them all.
        self.rank, self.world_size = rank, world_size
        self.holdout_percent = cfg.holdout_percent
        self.packer = ContextPacker(
            tokenizer, cfg.context_size, cfg.prepend_bos, packing=cfg.packing
        )
        self.epoch = 0

    def _docs(self, held_out: bool, epoch: int) -> Iterator[Document]:
        for text in iter_documents(self.cfg, self.seed, epoch):
            if is_held_out(text, self.holdout_percent) == held_out:
                yield text

    def held_out(self, n_contexts: int, batch_size: int) -> list[TokenBatch]:
        """The first `n_contexts` held-out contexts (fewer if the held-out split is small)."""
        contexts: list[torch.Tensor] = []
        for ctx in self.packer.contexts(self._docs(held_out=True, epoch=0)):
            contexts.append(ctx)
            if len(contexts) == n_contexts:
                break
        if not contexts:
            raise ConfigError(
                f"data: the held-out split ({self.cfg.holdout_percent}% of documents) of "
                f"{self._describe()} yielded no full context of {self.cfg.context_size} tokens; "
                "with few, long documents set data.sample_by=paragraph or raise "
                "data.holdout_percent (an empty dataset also ends here)"
            )
        if len(contexts) < n_contexts:
            log.warning(
                "held-out split has only %d contexts of the %d asked for by eval.n_tokens",
                len(contexts),
                n_contexts,
            )
        return list(batched(iter(contexts), batch_size, self.packer))

    def held_out_stream(self, batch_size: int) -> Iterator[TokenBatch]:
        """Every held-out context in the order `held_out` takes them, batch by batch (nothing
        is held but the batch being packed)."""
        return batched(self.packer.contexts(self._docs(held_out=True, epoch=0)), batch_size,
                       self.packer)  # fmt: skip

    def training(self, batch_size: int, skip_contexts: int = 0) -> Iterator[TokenBatch]:
        """Endless training batches of this rank's contexts, epoch after epoch.

        The first `skip_contexts` of them are packed but not returned: a resumed run, or one that
        read them from the activation cache, continues the same stream where it stopped.
        """
        contexts = rank_items(
            self._training_contexts(), self.world_size, self.rank, skip_local=skip_contexts
        )
        yield from batched(contexts, batch_size, self.packer)

    def _training_contexts(self) -> Iterator[torch.Tensor]:
        while True:
            produced = False
            for ctx in self.packer.contexts(self._docs(held_out=False, epoch=self.epoch)):
                produced = True
                yield ctx
            if not produced:
                raise ConfigError(
                    f"data: {self._describe()} yielded no full training context of "
                    f"{self.cfg.context_size} tokens (is the dataset empty?)"
                )
            self.epoch += 1
            log.info("data: finished a pass over the dataset; starting epoch %d", self.epoch)

    def _describe(self) -> str:
        if self.cfg.path in LOCAL_BUILDERS:
            return f"data.data_files={list(self.cfg.data_files)}"
        return f"data.path={self.cfg.path!r}"
