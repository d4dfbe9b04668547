"""Synthetic stand-ins with known answers, for tests and benchmarks: activations built from known
feature directions (features.py), cross-layer features a CLT should find (cross_layer.py), and a
tiny random Llama with a word tokenizer and corpus (tiny_llama.py). Nothing in the run imports them.
"""
