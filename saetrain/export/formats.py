"""Which tool wrote a dictionary folder, told from its file names: the one place formats are told
apart.

- SAELens (and saetrain): cfg.json + sae_weights.safetensors (saetrain/export/saelens.py);
- sparsify (EleutherAI): cfg.json + sae.safetensors, one folder per hookpoint
  (saetrain/export/read_sparsify.py);
- dictionary_learning (saprmarks): config.json + ae.pt
  (saetrain/export/read_dictionary_learning.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from saetrain.errors import FolderFormatError

FolderFormat = Literal["saelens", "sparsify", "dictionary_learning"]

# The files that make a folder of each format, config first.
FORMAT_FILES: dict[FolderFormat, tuple[str, str]] = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
}


def folder_format(folder: str | Path) -> FolderFormat:
    """The format of `folder`, or a FolderFormatError naming every layout saetrain reads."""
    folder = Path(folder)
    for name, files in FORMAT_FILES.items():
        if all((folder / f).is_file() for f in files):
            return name
    layouts = ", ".join(f"{' + '.join(files)} ({name})" for name, files in FORMAT_FILES.items())
    if folder.is_dir():
        found = f"it holds {sorted(p.name for p in folder.iterdir())[:12]}"
    else:
        found = "it does not exist"
    raise FolderFormatError(
        f"{folder} holds no {layouts.replace('), ', ') nor ')}; {found}: is {folder} a saved "
        "dictionary?"
    )
