"""A tiny randomly initialised Llama and a word-level tokenizer in a local folder, plus a corpus.

Lets the tests (tests/conftest.py, tests/interop/) and the scripts' smoke runs
(scripts/gpu_check_parts.py, through saetrain/bench/models.py) run the whole pipeline (run(),
the evaluation CLI, sweeps) in seconds, with no download. Imported by nothing but the benchmarks'
shared code (saetrain/bench/).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(120)]
# Alphabetic words for the first-letter task (evaluation/usefulness): 6 per letter, the capital
# letters (its answers) and the template's words.
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
LETTER_WORDS = [c + end for c in ALPHABET for end in ("a", "el", "on", "ust", "ix", "or")]
LETTER_WORDS += [c.upper() for c in ALPHABET] + ["has", "the", "first", "letter", ":"]


def build_word_tokenizer(words: list[str] = WORDS):
    """The tiny model's tokenizer: one token per word of `words`, BOS <s>, EOS </s>."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_llama(folder: Path, words: list[str] = WORDS) -> Path:
    """Save a 3-layer, d_model 32 Llama and its tokenizer (over `words`) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(words)
    tokenizer.save_pretrained(folder)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def build_corpus(
    folder: Path, n_docs: int = 120, words_per_doc: int = 60, words: list[str] = WORDS
) -> Path:
    """`n_docs` text files of random words from the tiny vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n_docs):
        ids = torch.randint(0, len(words), (words_per_doc,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(words[j] for j in ids))
    return folder
