"""Test-wide settings: never touch the network or the user's caches."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="saetrain-test-hf-"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small matrices on 2 shared cores run fastest on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny randomly initialised Llama with a word-level tokenizer, and a corpus of its words: runs on
# them take seconds. The real model is exercised in test_e2e.py.
WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # Imported here: the offline variables above must be set before huggingface_hub loads.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for i in range(120):
        ids = torch.randint(0, len(WORDS), (60,), generator=g).tolist()
        (folder / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in ids))
    return folder
