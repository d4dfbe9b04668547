"""Test-wide settings: never touch the network or the user's caches."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.helpers.fake_hub import FakeHub, _handler
from tests.helpers.interpreted_triton import import_interpreted_triton_ops

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "offline"

# Triton decorates its own language (tl.zeros, ...) when it is first imported, in the mode
# TRITON_INTERPRET says at that moment, and transformers' model modules import triton too. The
# kernel tests need it interpreted on CPU, so it is imported here, before any test module is
# collected (with SAETRAIN_TRITON_TESTS=cuda the helper imports the compiled kernels instead).
import_interpreted_triton_ops()

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
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from saetrain.synthetic.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def word_tokenizer():
    """The tiny model's word-level tokenizer alone (no model is built)."""
    from saetrain.synthetic.tiny_llama import build_word_tokenizer

    return build_word_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from saetrain.synthetic.tiny_llama import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"))


# The same tiny Llama over alphabetic words, with its corpus: the first-letter task has words.
@pytest.fixture(scope="module")
def letters_model(tmp_path_factory) -> tuple[Path, Path]:
    from saetrain.synthetic.tiny_llama import LETTER_WORDS, build_corpus, build_tiny_llama

    root = tmp_path_factory.mktemp("letters_llama")
    model = build_tiny_llama(root / "model", LETTER_WORDS)
    return model, build_corpus(root / "corpus", words=LETTER_WORDS)


# A fake Hub on localhost (tests/helpers/fake_hub.py): publishing tests talk to it only.
@pytest.fixture
def online(monkeypatch) -> None:
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to localhost only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def fake_hub(online) -> Iterator[tuple[FakeHub, str]]:
    hub = FakeHub()
    base_url: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, base_url))
    base_url.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub, base_url[0]
    server.shutdown()
    server.server_close()
