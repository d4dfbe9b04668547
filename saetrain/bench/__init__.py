"""What the benchmark scripts (scripts/) share, so that each script is argparse and calls.

One job per module:

    rows      an LM's activation rows at a site, in memory (the default data, the LM hooked)
    fit       one dictionary trained on a tensor of rows, in a seeded order (training/fit.py)
    score     the one way a benchmark scores a raw-scale dictionary on rows (evaluation/metrics)
    models    tiny and random models of each family, built locally (no download)
    launch    the torchrun command a benchmark launches runs with
    report    markdown tables, JSON files and the package versions a result records

Benchmarks compare dictionaries, so everything here is made so that two dictionaries trained on
the same rows with the same seed differ only by their settings. The package itself never imports
this subpackage; scripts and tests do.
"""
