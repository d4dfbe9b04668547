"""cfg.json's `architecture` → the class that loads a single-site dictionary (SAE, transcoder).

SAELens's names where SAELens has the architecture; BatchTopK and Matryoshka export as JumpReLU:
what they compute at inference. Apart from the registry (saetrain/dictionaries/registry.py) so
that a crosscoder's loader can find its inner architecture without importing the registry that
imports it.
"""

from __future__ import annotations

from saetrain.dictionaries.base import Dictionary
from saetrain.dictionaries.gated import GatedSAE
from saetrain.dictionaries.jumprelu import JumpReLUSAE
from saetrain.dictionaries.relu import ReLUSAE
from saetrain.dictionaries.topk import TopKSAE

SINGLE_SITE_LOADERS: dict[str, type[Dictionary]] = {
    "standard": ReLUSAE,
    "transcoder": ReLUSAE,
    "skip_transcoder": ReLUSAE,
    "gated": GatedSAE,
    "gated_skip_transcoder": GatedSAE,
    "topk": TopKSAE,
    "topk_skip_transcoder": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "jumprelu_transcoder": JumpReLUSAE,
    "jumprelu_skip_transcoder": JumpReLUSAE,
}

# SAELens's name of an SAE whose saetrain architecture has another name (model cards read
# cfg.json's `architecture` when saetrain's own is not recorded).
SAELENS_SAE_NAMES: dict[str, str] = {"standard": "relu"}
