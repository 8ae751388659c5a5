"""Training a sentencepiece model from documents (used by tools/train_tokenizer.py and the
built-in default corpus).

Each non-blank line of a document is one training "sentence".  Normalisation is off
(``identity``, extra whitespace kept), so ``decode(encode(text)) == text`` for any text,
indentation and newlines included; byte fallback (on by default) encodes characters outside the
vocabulary as their UTF-8 bytes instead of ``<unk>``.

Memory stays bounded on any corpus: sentencepiece keeps a uniform reservoir sample of at most
``sample_sentences`` sentences while the whole input streams through once.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import sentencepiece as spm

MODEL_TYPES = ("bpe", "unigram")
# unk, bos, eos, pad; with byte fallback the 256 byte pieces come on top.
NUM_SPECIAL = 4
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class _Sentences:
    """The non-blank lines of ``documents``.  A ValueError raised while reading (a bad input line)
    ends the iteration and is kept in ``error``: raised inside sentencepiece's C++ loop it would
    come back as an unreadable RuntimeError."""

    def __init__(self, documents: Iterable[str]):
        self.documents = documents
        self.error: ValueError | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for doc in self.documents:
                for line in doc.split("\n"):
                    if line.strip():
                        yield line
        except ValueError as err:
            self.error = err


def train_sentencepiece(
    documents: Iterable[str],
    *,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    sample_sentences: int = 2_000_000,
    seed: int = 0,
    quiet: bool = True,
) -> str:
    """Train on ``documents`` and write ``{model_prefix}.model`` / ``.vocab``; return the model path.

    ``sample_sentences`` caps how many lines sentencepiece holds in memory (reservoir sampled
    with ``seed``, so the same input gives the same model).
    Raises ValueError naming the flag for a bad ``--vocab-size``, ``--model-type``,
    ``--character-coverage`` or ``--sample-sentences``, and for a training failure (typically a
    vocabulary too large for the text).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model-type {model_type}: choose one of {', '.join(MODEL_TYPES)}")
    minimum = NUM_SPECIAL + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise ValueError(f"--vocab-size {vocab_size}: must be at least {minimum} (specials + byte pieces + 1)")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"--character-coverage {character_coverage}: must be in (0, 1]")
    if sample_sentences <= 0:
        raise ValueError(f"--sample-sentences {sample_sentences}: must be positive")
    directory = os.path.dirname(model_prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    spm.set_random_generator_seed(seed)
    sentences = _Sentences(documents)
    # Train under a temporary name so that a failed run leaves no model behind.
    tmp_prefix = f"{model_prefix}.tmp{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=16384,
            input_sentence_size=sample_sentences,
            shuffle_input_sentence=True,
            num_threads=min(16, os.cpu_count() or 1),
            minloglevel=2 if quiet else 0,
            **SPECIAL_IDS,
        )
        failure = sentences.error
    except RuntimeError as err:
        failure = sentences.error or ValueError(f"sentencepiece training of {model_prefix}.model failed: {err}")
    if failure is not None:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
        raise failure
    for suffix in (".vocab", ".model"):
        os.replace(tmp_prefix + suffix, model_prefix + suffix)
    return f"{model_prefix}.model"
