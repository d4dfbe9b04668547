"""Packing documents into contexts, the held-out split, and data errors."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saetrain.activations.tokens import ContextPacker, TokenSource, expand_data_files, is_held_out
from saetrain.config import DataConfig
from saetrain.errors import ConfigError

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: 'w7' has id 10 (three special tokens come first)."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def _doc(*ids: int) -> str:
    return " ".join(WORDS[i] for i in ids)


def test_contexts_start_with_bos_and_separate_documents(tokenizer):
    packer = ContextPacker(tokenizer, context_size=4, prepend_bos=True)
    docs = [_doc(0, 1, 2, 3), _doc(4, 5)]
    got = [c.tolist() for c in packer.contexts(docs)]
    # stream: 3 4 5 6 <eos> 7 8 <eos>; bodies of 3 tokens each behind BOS=0
    assert got == [[0, 3, 4, 5], [0, 6, 1, 7]]  # the incomplete tail [8, <eos>] is held back


def test_without_bos_contexts_are_plain_slices(tokenizer):
    packer = ContextPacker(tokenizer, context_size=3, prepend_bos=False)
    got = [c.tolist() for c in packer.contexts([_doc(0, 1, 2, 3, 4, 5, 6, 7)])]
    assert got == [[3, 4, 5], [6, 7, 8], [9, 10, 1]]


def test_mask_excludes_special_tokens(tokenizer):
    packer = ContextPacker(tokenizer, context_size=4, prepend_bos=True)
    ids = torch.tensor([[0, 6, 1, 7]])
    assert packer.mask(ids).tolist() == [[False, True, False, True]]


def test_prepend_bos_without_bos_or_eos_is_an_error():
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ConfigError, match="data.prepend_bos"):
        ContextPacker(fast, context_size=4, prepend_bos=True)


def _write_docs(folder, n_docs: int, words_per_doc: int) -> list[str]:
    texts = []
    for d in range(n_docs):
        text = _doc(*[(d * 7 + j) % len(WORDS) for j in range(words_per_doc)])
        (folder / f"doc{d:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def test_held_out_documents_never_reach_training(tmp_path, tokenizer):
    texts = _write_docs(tmp_path, n_docs=60, words_per_doc=9)
    cfg = DataConfig(
        path="text",
        data_files=[str(tmp_path / "*.txt")],
        context_size=10,
        prepend_bos=True,
        shuffle_buffer=8,
        holdout_percent=25.0,
    )
    held = {t for t in texts if is_held_out(t, 25.0)}
    assert 0 < len(held) < len(texts)
    source = TokenSource(cfg, tokenizer, seed=0)
    sep = tokenizer.eos_token_id

    def docs_in(batches) -> set[tuple[int, ...]]:
        stream = [t for b in batches for row in b.input_ids.tolist() for t in row[1:]]
        out, cur = set(), []
        for t in stream:
            if t == sep:
                out.add(tuple(cur))
                cur = []
            else:
                cur.append(t)
        return out

    def ids_of(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    eval_docs = docs_in(source.held_out(n_contexts=1000, batch_size=4))
    train_iter = source.training(batch_size=4)
    train_docs = docs_in([next(train_iter) for _ in range(20)])  # > one epoch of training text
    held_ids = {ids_of(t) for t in held}
    assert eval_docs and eval_docs <= held_ids
    assert train_docs and not (train_docs & held_ids)
    assert source.epoch >= 1  # training went round to a new epoch instead of stopping


def test_same_seed_same_order_other_seed_other_order(tmp_path, tokenizer):
    _write_docs(tmp_path, n_docs=40, words_per_doc=9)
    cfg = DataConfig(data_files=[str(tmp_path / "*.txt")], context_size=8, shuffle_buffer=16)

    def first(seed: int) -> torch.Tensor:
        return next(TokenSource(cfg, tokenizer, seed).training(batch_size=8)).input_ids

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_missing_path_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing_here" / "*.txt")
    with pytest.raises(ConfigError, match="nothing_here"):
        expand_data_files([pattern])


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    cfg = DataConfig(data_files=[str(tmp_path / "empty.txt")], context_size=8)
    source = TokenSource(cfg, tokenizer, seed=0)
    with pytest.raises(ConfigError, match="no full"):
        source.held_out(4, 2)
    with pytest.raises(ConfigError, match="no full training context"):
        next(source.training(batch_size=2))
