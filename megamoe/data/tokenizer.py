"""Tokenizers: the interface the pipeline needs, and its sentencepiece implementation.

    tok = load_tokenizer("cache/default_corpus/tokenizer.model")
    ids = tok.encode("def f(x):\\n    return x")      # list[int]
    text = tok.decode(ids)

The special ids follow the convention ``train_sentencepiece`` writes (unk 0, bos 1, eos 2,
pad 3).  For GPT pretraining the end-of-document token (EOD) is the EOS piece, as in
Megatron's sentencepiece tokenizer; a model without an EOS piece is refused, because documents
could not be separated.
"""

from __future__ import annotations

import os

import sentencepiece as spm


class Tokenizer:
    """What the data pipeline and the trainer need from a tokenizer.

    ``vocab_size`` counts every id ``encode`` can return (ids are in ``[0, vocab_size)``).
    ``eod_id`` ends every document in a preprocessed dataset.  ``pad_id`` is a real id of the
    vocabulary (never -1), so it can be stored in any dataset dtype.
    """

    vocab_size: int
    eod_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; implementations may do it faster in one call."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file.  ``encode_batch`` runs in the calling thread only, so
    that multi-process preprocessing controls its own parallelism."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = _load_processor(model_path)
        self.vocab_size = self._sp.vocab_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"tokenizer model {model_path}: it has no EOS piece, which GPT data needs to mark "
                "the end of each document; train it with tools/train_tokenizer.py"
            )
        self.eod_id = self.eos_id
        # sentencepiece reports -1 for a piece the model lacks; a pad must be storable as a token.
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        # Worker processes reload the model from its path instead of pickling the C++ object.
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


def _load_processor(model_path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(model_path):
        raise ValueError(f"tokenizer model {model_path}: no such file (--tokenizer-model)")
    try:
        return spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as err:
        raise ValueError(
            f"tokenizer model {model_path}: not a sentencepiece model ({err}); "
            "pass the .model file written by tools/train_tokenizer.py"
        ) from None


def load_tokenizer(path: str) -> Tokenizer:
    """Load the sentencepiece model at ``path``.

    Raises ``ValueError`` naming ``path`` if the file is missing, is not a sentencepiece model,
    or has no EOS piece to serve as the end-of-document token.
    """
    return SentencePieceTokenizer(path)
