"""Models a benchmark builds for itself, of each size it needs, with no download.

The tests' 3-layer Llama, its word tokenizer and corpus come from saetrain/synthetic/tiny_llama.py
(re-exported here). `word_llama` saves a random Llama of a chosen shape over a word vocabulary
into a folder (runs read it as model.name); `random_llama` builds a ~1.1B random Llama
(TinyLlama's shape) in bf16 on the device, or a toy one: LM throughput without weights to fetch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saetrain.synthetic.tiny_llama import (
    LETTER_WORDS,
    WORDS,
    build_corpus,
    build_tiny_llama,
    build_word_tokenizer,
)

__all__ = [
    "LETTER_WORDS",
    "WORDS",
    "build_corpus",
    "build_tiny_llama",
    "build_word_tokenizer",
    "random_llama",
    "word_llama",
]


def word_llama(
    folder: Path, words: list[str], d_model: int, layers: int, context: int
) -> dict[str, Any]:
    """A randomly initialised Llama (heads of 64, SwiGLU width ≈ 8/3 · d_model) and a word-level
    tokenizer over `words` (which must not hold the specials <s> </s> <unk>), saved with
    save_pretrained into `folder`; returns the model's description."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(words)
    tokenizer.save_pretrained(folder)
    vocab = len(tokenizer.get_vocab())
    heads = max(1, d_model // 64)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=(8 * d_model // 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(context, 128),
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return {
        "family": "llama (random init)",
        "d_model": d_model,
        "layers": layers,
        "heads": heads,
        "intermediate": cfg.intermediate_size,
        "vocab": vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def random_llama(device: torch.device, toy: bool = False) -> torch.nn.Module:
    """A Llama built from a config with random bf16 weights, made on the device: about 1.1B
    parameters (TinyLlama's shape: d_model 2048, 22 layers, MLP 5632, vocab 32000), or a toy."""
    if toy:
        sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
        sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    else:
        sizes = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22}
        sizes |= {"num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
    cfg = LlamaConfig(**sizes, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval().requires_grad_(False)
