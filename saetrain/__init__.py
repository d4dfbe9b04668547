"""saetrain: train sparse autoencoders and transcoders on the activations of HF language models.

kernels/ and configs/ sit at the repository's top level and are installed inside this package
(as saetrain.kernels and saetrain/configs). Imported from a source checkout — `python -m saetrain`
in the repository, or an editable install — this folder lacks them, so the package also looks in
the folder beside it. Neither folder has an `__init__.py`: a bare `import kernels` (a name taken on
PyPI, probed by transformers) must never find the project's kernels.
"""

from importlib import import_module as _import_module
from pathlib import Path as _Path

__version__ = "0.1.0"

_here = _Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels").is_dir():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)


def config_dir() -> str:
    """The folder holding config.yaml and the config groups."""
    for base in __path__:  # noqa: F821
        candidate = _Path(base) / "configs"
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("saetrain's configs folder is missing from the installation")


# The Python API and the config dataclasses, imported on first use (PEP 562) so that
# `import saetrain` loads neither torch nor Hydra: the sweep callback imports it in every run.
_API = ("config_from_overrides", "check", "train", "load", "read_activations",
        "collect_activations", "gather_activations", "TrainResult",
        "TrainedDictionary")  # fmt: skip
_CONFIG = ("Config", "ConfigError", "ModelConfig", "DataConfig", "SiteConfig", "BufferConfig",
           "CacheConfig", "CheckpointConfig", "DictionaryConfig", "TrainerConfig", "EvalConfig",
           "LoggerConfig", "PublishConfig", "DictionarySpec", "validate")  # fmt: skip
# Names whose module is neither of those two.
_HOME = {"ConfigError": "saetrain.errors", "validate": "saetrain.checks"}
__all__ = ["config_dir", *_API, *_CONFIG]


def __getattr__(name: str):
    if name in _API or name in _CONFIG:
        value = getattr(
            _import_module(_HOME.get(name, "saetrain.api" if name in _API else "saetrain.config")),
            name,
        )
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saetrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
