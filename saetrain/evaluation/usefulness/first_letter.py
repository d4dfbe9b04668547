"""The first-letter task's data: the LM's own alphabetic tokens as words, in-context prompts, and
the LM's activations at the dictionary's input site on each prompt.

As SAEBench builds it (sae_bench/evals/absorption/vocab.py, prompting.py): a word is a vocabulary
token whose text is letters only (one leading space allowed); the words are split by token into
train and test; a prompt is `icl_examples` lines `<example> has the first letter: <LETTER>` drawn
from the same split, then `<word> has the first letter:`, lines separated (and preceded) by a
newline. Prompts are built from token ids, so the word is exactly its own token wherever it
stands; prompts of different lengths are right-padded, which a causal LM never sees.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

import torch

from saetrain.activations.source import ActivationSource
from saetrain.config import AbsorptionConfig
from saetrain.progress import Progress

LETTERS = string.ascii_lowercase


@dataclass
class Word:
    token_id: int
    text: str  # as the token decodes (a leading space kept)

    @property
    def letter(self) -> int:
        """Index of the word's first letter in LETTERS."""
        return LETTERS.index(self.text.strip()[0].lower())


@dataclass
class FirstLetterData:
    """Activations at the read position of each prompt, [n, d_in], and each word's letter."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_words: list[str]
    # Where the activations were read, counted from the prompt's end (-1: its last token).
    position: int


def alphabetic_words(tokenizer) -> list[Word]:
    """Every vocabulary token whose text is ASCII letters only (after one leading space)."""
    words = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        bare = text[1:] if text.startswith(" ") else text
        if bare and all(c in string.ascii_letters for c in bare):
            words.append(Word(token_id, text))
    return words


def split_words(words: list[Word], cfg: AbsorptionConfig, seed: int) -> tuple[list[Word], ...]:
    """A seeded choice of at most max_words words, split by token into train and test."""
    rng = random.Random(seed)
    chosen = rng.sample(words, len(words))
    if cfg.max_words is not None:
        chosen = chosen[: cfg.max_words]
    cut = int(len(chosen) * cfg.train_fraction)
    return chosen[:cut], chosen[cut:]


class PromptBuilder:
    """Token ids of the in-context prompts for one tokenizer and template."""

    def __init__(self, tokenizer, cfg: AbsorptionConfig):
        def ids(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False)) if text else []

        before, after = cfg.prompt_template.split("{word}", 1)
        self.before, self.after = ids(before), ids(after)
        self.separator = ids("\n")
        self.answers = [ids(" " + c.upper()) for c in LETTERS]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [] if bos is None else [int(bos)]
        self.icl_examples = cfg.icl_examples
        # The word's token counted from the end of a prompt.
        self.word_position = -(len(self.after) + 1)

    def prompt(self, word: Word, pool: list[Word], rng: random.Random) -> list[int]:
        """`icl_examples` answered lines from `pool` (never the word itself), then the word's."""
        others = [w for w in rng.sample(pool, min(len(pool), self.icl_examples + 1)) if w != word]
        ids = self.bos + self.separator
        for example in others[: self.icl_examples]:
            ids += self.before + [example.token_id] + self.after + self.answers[example.letter]
            ids += self.separator
        return ids + self.before + [word.token_id] + self.after


def right_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, longest] ids padded with 0 after each prompt, [n] lengths): a causal LM's
    activations at a prompt's own positions do not see the padding after it."""
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    return ids, lengths


def read_activations(
    source: ActivationSource,
    sites: list[str],
    prompts: list[list[int]],
    position: int,
    batch_prompts: int,
    progress: Progress,
) -> torch.Tensor:
    """Activations [len(prompts), Σ width] at `position` from each prompt's end, the sites side by
    side (a crosscoder's sources), in float32 on the CPU."""
    rows = []
    for start in range(0, len(prompts), batch_prompts):
        batch = prompts[start : start + batch_prompts]
        ids, lengths = right_padded(batch)
        acts = source(ids)
        at = (lengths + position).to(source.device)
        picked = [acts[s][torch.arange(len(batch), device=at.device), at] for s in sites]
        rows.append(torch.cat(picked, dim=-1).float().cpu())
        progress.update(len(batch))
    return torch.cat(rows)


@dataclass
class Prompts:
    """The task's words and their prompts' token ids, and where the activations are read."""

    train: list[Word]
    test: list[Word]
    train_prompts: list[list[int]]
    test_prompts: list[list[int]]
    position: int


def build_prompts(tokenizer, cfg: AbsorptionConfig, seed: int) -> Prompts:
    """The seeded words, their split and their prompts."""
    words = alphabetic_words(tokenizer)
    if len(words) < 10:
        raise ValueError(
            f"the tokenizer has {len(words)} alphabetic tokens; the first-letter task needs words"
        )
    train, test = split_words(words, cfg, seed)
    builder = PromptBuilder(tokenizer, cfg)
    rng = random.Random(seed + 1)
    return Prompts(
        train,
        test,
        [builder.prompt(w, train, rng) for w in train],
        [builder.prompt(w, test, rng) for w in test],
        builder.word_position if cfg.position is None else cfg.position,
    )


def first_letter_data(
    source: ActivationSource, sites: list[str], tokenizer, cfg: AbsorptionConfig, seed: int
) -> FirstLetterData:
    """The task's train and test activations at `sites` (LM forwards, with progress lines)."""
    p = build_prompts(tokenizer, cfg, seed)
    total = len(p.train_prompts) + len(p.test_prompts)
    batch = max(1, min(cfg.batch_prompts, math.ceil(total / 2)))
    with Progress("absorption: LM forwards on first-letter prompts", total, "prompts") as progress:
        train_x = read_activations(source, sites, p.train_prompts, p.position, batch, progress)
        test_x = read_activations(source, sites, p.test_prompts, p.position, batch, progress)
    return FirstLetterData(
        train_x=train_x,
        train_y=torch.tensor([w.letter for w in p.train]),
        test_x=test_x,
        test_y=torch.tensor([w.letter for w in p.test]),
        test_words=[w.text for w in p.test],
        position=p.position,
    )
