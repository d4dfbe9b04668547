"""Start a run from a trained dictionary's folder (`dictionary.init_from`): fine-tuning.

The folder is read with `load_dictionary` (saetrain's own folders, SAELens's, and whatever other
layouts that loader reads), as weights for raw activations. What the dictionary's shape fixes
(`Dictionary.config_fields`: architecture, number of latents, k, skip) comes from the folder; the
training settings are the run's. Training works on normalised activations s·x: the weights are
moved into that space by the inverse of the fold that exports a trained dictionary
(`fold_input_scale` with 1/s), so the run's starting dictionary, folded back, is the folder's on
raw activations. s is the folder's own run's when saetrain_run.json records it for the same sites
(the weights are then the ones it trained, decoder rows of unit norm); otherwise it is estimated
from this run's first activations like a new dictionary's, and decoder rows that the trainer
keeps at unit norm are made so by rescaling each latent's code (the same output).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saetrain.config import Config, DictionaryConfig
from saetrain.dictionaries import Dictionary, latents_per_input
from saetrain.dictionaries.base import fvu_loss
from saetrain.errors import ConfigError
from saetrain.export.saelens import RUN_FILE, load_dictionary

log = logging.getLogger(__name__)


@dataclass
class Start:
    """A run's starting point: the folder's dictionary and what the run takes from it."""

    folder: Path
    # The folder's dictionary for raw activations, on the CPU (never changed: copied from).
    dictionary: Dictionary
    # The `dictionary.*` settings its shape fixes (Dictionary.config_fields).
    fields: dict[str, Any]
    # (input, target) normalisation scales the folder's run trained with on these sites; None
    # where the folder does not record them (another tool's) or its run read other sites.
    scales: tuple[float, float] | None

    def describe(self) -> str:
        """What was taken from the folder, for the log."""
        taken = ", ".join(f"{k}={v}" for k, v in self.fields.items())
        scales = (
            f"its run's normalisation scales {self.scales[0]:.4g} / {self.scales[1]:.4g}"
            if self.scales is not None
            else "normalisation scales estimated from this run's activations"
        )
        return f"starts from {self.folder}: {taken}; {scales}"

    def record(self) -> dict[str, Any]:
        """saetrain_run.json's `init_from`."""
        return {
            "folder": str(self.folder),
            "taken_from_folder": self.fields,
            "normalization": "folder" if self.scales is not None else "estimated",
        }


def read_start(folder: str, input_site: str, target_site: str) -> Start:
    """The dictionary in `folder` (dictionary.init_from) for a run on these sites; an unreadable
    folder, or a kind a run cannot start from, is a ConfigError naming the field."""
    where = f"dictionary.init_from={folder!r}"
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder")
    try:
        dictionary = load_dictionary(path, "cpu")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if not dictionary.fine_tunable:
        raise ConfigError(
            f"{where} holds a {dictionary.kind}; a run starts only from an SAE or a transcoder "
            "on one site"
        )
    return Start(path, dictionary, dictionary.config_fields(),
                 _recorded_scales(path, input_site, target_site))  # fmt: skip


def _recorded_scales(folder: Path, input_site: str, target_site: str) -> tuple[float, float] | None:
    """The scales saetrain_run.json records, when its run read the same sites."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    site = (info.get("config") or {}).get("site") or {}
    if (site.get("input"), site.get("target") or site.get("input")) != (input_site, target_site):
        return None
    s_in, s_out = info.get("normalization_scale"), info.get("target_normalization_scale")
    if isinstance(s_in, int | float) and isinstance(s_out, int | float):
        return float(s_in), float(s_out)
    return None


def starting_config(cfg: Config, start: Start, d_in: int) -> Config:
    """`cfg` with the folder's architecture, width, k and skip. A value set in `cfg` that differs
    from both the default and the folder's is an error naming both; `d_in`: the run's input
    width, which an expansion factor multiplies."""
    d, default = cfg.dictionary, DictionaryConfig()
    where = f"dictionary.init_from={d.init_from!r}"
    for name, value in start.fields.items():
        mine = getattr(d, name)
        if mine != getattr(default, name) and mine != value:
            raise ConfigError(
                f"dictionary.{name}={mine!r}, but the folder {where} holds {name}={value!r}: a "
                f"fine-tuned dictionary keeps the folder's; leave dictionary.{name} unset"
            )
    n_latents = start.fields["n_latents"]
    if d.n_latents is None and d.expansion_factor != default.expansion_factor:
        if latents_per_input(d, d_in) != n_latents:
            raise ConfigError(
                f"dictionary.expansion_factor={d.expansion_factor} × d_in={d_in} = "
                f"{latents_per_input(d, d_in)} latents, but the folder {where} holds "
                f"{n_latents}: a fine-tuned dictionary keeps the folder's; leave "
                "dictionary.expansion_factor unset"
            )
    return dataclasses.replace(cfg, dictionary=dataclasses.replace(d, **start.fields))


def check_start_fits(start: Start, d_in: int, d_out: int, transcoder: bool, sites: str) -> None:
    """The folder's dictionary reads and writes the run's sites' widths (and is an SAE or a
    transcoder as the sites say)."""
    sd, where = start.dictionary, f"dictionary.init_from={str(start.folder)!r}"
    if sd.transcoder != transcoder:
        held = "a transcoder" if sd.transcoder else "an SAE"
        wanted = "a transcoder" if transcoder else "an SAE"
        raise ConfigError(
            f"{where} holds {held} ({sd.d_in} → {sd.d_out}), but the run's sites {sites} make "
            f"{wanted}; set site.target to match"
        )
    if (sd.d_in, sd.d_out) != (d_in, d_out):
        raise ConfigError(
            f"{where}: the folder's dictionary is {sd.d_in} → {sd.d_out} wide, but the run's "
            f"sites {sites} are {d_in} → {d_out} wide; is this the model and site it was "
            "trained on?"
        )


@torch.no_grad()
def start_weights_(dictionary: Dictionary, start: Start, scale_in: float, scale_out: float) -> None:
    """Set a freshly built `dictionary` (same class and shape) to the folder's, moved into the
    run's normalised space (x·scale_in → y·scale_out); its decoder rows made unit norm where the
    trainer keeps them so and the architecture can rescale its codes without changing them."""
    work = copy.deepcopy(start.dictionary).to(torch.float64)
    work.fold_input_scale(1.0 / scale_in, 1.0 / scale_out)  # the inverse of the export's fold
    if dictionary.unit_norm_decoder:
        norms = work.decoder_norms()
        if float((norms - 1.0).abs().max()) > 1e-6:
            if not work.scale_latents_(norms.where(norms > 0, torch.ones_like(norms))):
                log.warning(
                    "%s: decoder rows of norms %.4g .. %.4g in the run's normalised space; the "
                    "first step makes them unit norm, which changes the dictionary (%s codes "
                    "cannot be rescaled per latent)",
                    start.folder, float(norms.min()), float(norms.max()), work.architecture,
                )  # fmt: skip
    mine = dictionary.state_dict()
    dictionary.load_state_dict({k: v.to(mine[k].dtype) for k, v in work.state_dict().items()})


@torch.no_grad()
def start_fvu(dictionary: Dictionary, x: torch.Tensor, y: torch.Tensor) -> float:
    """The starting dictionary's FVU on normalised rows (the initialisation samples)."""
    return float(fvu_loss(y, dictionary(x))[0])
