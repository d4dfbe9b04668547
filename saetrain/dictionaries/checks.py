"""The dictionary fields of a config checked against the architectures' own vocabulary (their
names, their loss options, which family sets its L0 how), before any weights exist."""

from __future__ import annotations

from saetrain.config import Config
from saetrain.dictionaries import ARCHITECTURES, KINDS
from saetrain.dictionaries.jumprelu import PRE_ACT_LATENTS, SPARSITY_LOSSES
from saetrain.dictionaries.layout import check_cross_layer
from saetrain.dictionaries.matryoshka import MATRYOSHKA_REDUCTIONS
from saetrain.dictionaries.topk import AUX_K_NORMALIZATIONS
from saetrain.errors import ConfigError
from saetrain.planning.validate import choice, positive


def check_dictionary(cfg: Config) -> None:
    """One dictionary's fields (`cfg` is one entry of `dictionary_configs`); the message names
    the field, the value and the valid choices."""
    choice("dictionary.architecture", cfg.dictionary.architecture, tuple(ARCHITECTURES))
    folder = cfg.dictionary.init_from
    if folder is not None and not KINDS[cfg.dictionary.kind].fine_tunable:
        raise ConfigError(
            f"dictionary.init_from={folder!r}: a run starts from a folder's SAE or transcoder "
            f"(dictionary.kind=single), not dictionary.kind={cfg.dictionary.kind!r}"
        )
    check_cross_layer(cfg.dictionary)
    positive("dictionary.sparsity_coefficient", cfg.dictionary.sparsity_coefficient, True)
    positive("dictionary.jumprelu_bandwidth", cfg.dictionary.jumprelu_bandwidth)
    positive("dictionary.jumprelu_init_threshold", cfg.dictionary.jumprelu_init_threshold)
    d = cfg.dictionary
    choice("dictionary.aux_k_normalization", d.aux_k_normalization, AUX_K_NORMALIZATIONS)
    choice("dictionary.matryoshka_reduction", d.matryoshka_reduction, MATRYOSHKA_REDUCTIONS)
    choice("dictionary.jumprelu_sparsity_loss", d.jumprelu_sparsity_loss, SPARSITY_LOSSES)
    choice("dictionary.jumprelu_pre_act_latents", d.jumprelu_pre_act_latents, PRE_ACT_LATENTS)
    positive("dictionary.jumprelu_tanh_scale", d.jumprelu_tanh_scale)
    positive("dictionary.jumprelu_pre_act_coefficient", d.jumprelu_pre_act_coefficient, True)
    positive("trainer.target_l0_gain", cfg.trainer.target_l0_gain)
    if d.target_l0 is not None:
        if not ARCHITECTURES[d.architecture].penalised:
            raise ConfigError(
                f"dictionary.target_l0={d.target_l0} applies to the penalty architectures (relu, "
                f"gated, jumprelu); dictionary.architecture={d.architecture!r} sets its L0 with "
                "dictionary.k"
            )
        positive("dictionary.target_l0", d.target_l0)
        # A CLT's L0 is summed over its layers, its n_latents counts one layer's.
        layers = len(cfg.site.layers) if cfg.site.layers is not None else None
        per_input = KINDS[d.kind].latents_per_input
        if not per_input and d.n_latents is not None and d.target_l0 > d.n_latents:
            raise ConfigError(
                f"dictionary.target_l0={d.target_l0} exceeds dictionary.n_latents={d.n_latents}"
            )
        if per_input and d.n_latents is not None and layers is not None:
            if d.target_l0 > d.n_latents * layers:
                raise ConfigError(
                    f"dictionary.target_l0={d.target_l0} exceeds the CLT's latents: "
                    f"dictionary.n_latents={d.n_latents} per layer × {layers} layers"
                )
    if d.jumprelu_sparsity_loss == "quadratic" and d.target_l0 is None:
        raise ConfigError(
            "dictionary.jumprelu_sparsity_loss=quadratic is quadratic around a target L0: set "
            "dictionary.target_l0"
        )
    positive("trainer.sparsity_warmup_steps", cfg.trainer.sparsity_warmup_steps, True)
    if not 0.0 <= cfg.dictionary.threshold_momentum < 1.0:
        raise ConfigError(
            f"dictionary.threshold_momentum={cfg.dictionary.threshold_momentum} must be in [0, 1)"
        )
    prefixes = cfg.dictionary.matryoshka_prefixes
    if prefixes and not ARCHITECTURES[cfg.dictionary.architecture].nested_prefixes:
        raise ConfigError(
            f"dictionary.matryoshka_prefixes={list(prefixes)} only applies to "
            f"dictionary.architecture=matryoshka, not {cfg.dictionary.architecture!r}"
        )
    if prefixes:
        if list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 1:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes={list(prefixes)} must be strictly increasing "
                "positive sizes"
            )
        if cfg.dictionary.n_latents is not None and prefixes[-1] != cfg.dictionary.n_latents:
            raise ConfigError(
                f"dictionary.matryoshka_prefixes must end with dictionary.n_latents="
                f"{cfg.dictionary.n_latents}, got {list(prefixes)}"
            )
