"""What a dictionary reads and writes: its input sites and target sites, side by side in a row.

An SAE or a transcoder is the case of one input and one target. A crosscoder reads S sites and
reconstructs the same S; a cross-layer transcoder (CLT) reads one site per layer and writes one
per layer. Rows are [x_1 … x_S, y_1 … y_T] (the targets left out when they are the inputs), so
the trainer, the buffer and the checkpoints see one d_in and one d_out whatever the kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from saetrain.config import DictionaryConfig
from saetrain.errors import ConfigError

# Architectures each multi-site kind trains (single: every architecture).
CROSSCODER_ARCHITECTURES = ("relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka")
CLT_ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass(frozen=True)
class Layout:
    """The widths of a dictionary's input sites and target sites, in row order."""

    kind: str  # single | crosscoder | clt
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return sum(self.in_widths)

    @property
    def d_out(self) -> int:
        return sum(self.out_widths)

    @staticmethod
    def single(d_in: int, d_out: int) -> Layout:
        return Layout("single", (d_in,), (d_out,))

    @property
    def out_blocks(self) -> list[slice]:
        """Each target site's columns in a prediction."""
        return _blocks(self.out_widths)

    @property
    def in_blocks(self) -> list[slice]:
        return _blocks(self.in_widths)


def _blocks(widths: tuple[int, ...]) -> list[slice]:
    out, start = [], 0
    for width in widths:
        out.append(slice(start, start + width))
        start += width
    return out


def check_cross_layer(cfg: DictionaryConfig) -> None:
    """Refuse an architecture (or option) that a crosscoder or CLT does not train, by name."""
    if cfg.kind == "crosscoder":
        allowed = CROSSCODER_ARCHITECTURES
    elif cfg.kind == "clt":
        allowed = CLT_ARCHITECTURES
    else:
        return
    if cfg.architecture not in allowed:
        raise ConfigError(
            f"dictionary.architecture={cfg.architecture!r} is not trained as a "
            f"dictionary.kind={cfg.kind}; choose one of: {', '.join(allowed)}"
        )
    if cfg.kind == "crosscoder" and cfg.skip:
        raise ConfigError("dictionary.skip=true needs a transcoder; a crosscoder reconstructs")
