"""Tokenizers: the interface the pipeline needs, a sentencepiece and a Hugging Face implementation.

    tok = load_tokenizer("cache/default_corpus/tokenizer.model")
    tok = load_tokenizer("path/to/hf_tokenizer_dir", "HuggingFaceTokenizer")   # or a hub name
    ids = tok.encode("def f(x):\\n    return x")      # list[int]
    text = tok.decode(ids)

``--tokenizer-type`` takes Megatron's names: the sentencepiece ones (SentencePieceTokenizer,
GPTSentencePieceTokenizer, Llama2Tokenizer; the default) read a ``.model`` file,
HuggingFaceTokenizer reads a tokenizer directory or hub name through ``transformers``'
AutoTokenizer (an optional dependency: ``pip install megamoe[hf]``).

For GPT pretraining the end-of-document token (EOD) is the EOS token, as in Megatron's
tokenizers; a tokenizer without one is refused, because documents could not be separated.
Sentencepiece special ids follow the convention ``train_sentencepiece`` writes (unk 0, bos 1,
eos 2, pad 3).  The vocabulary size of a Hugging Face tokenizer counts its added tokens
(``len(tokenizer)``, Megatron's), and text is encoded with the tokenizer's own special tokens
(a BOS where it adds one), as Megatron's HuggingFaceTokenizer encodes it.
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


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer (directory or hub name) through ``transformers.AutoTokenizer``."""

    def __init__(self, name_or_path: str):
        self.name_or_path = name_or_path
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs the transformers package: "
                             "pip install 'megamoe[hf]' (or pip install transformers)") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--tokenizer-model {name_or_path}: not a Hugging Face tokenizer directory or hub "
                             f"name ({first_line})") from None
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise ValueError(f"--tokenizer-model {name_or_path}: the tokenizer has no EOS token, which GPT data "
                             "needs to mark the end of each document")
        self.eos_id = self.eod_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eod_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts)["input_ids"] if texts else []

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"name_or_path": self.name_or_path}

    def __setstate__(self, state):
        self.__init__(state["name_or_path"])


SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer",)


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


def load_tokenizer(path: str, tokenizer_type: str | None = None) -> Tokenizer:
    """The tokenizer ``--tokenizer-type`` names (None: sentencepiece) at ``path``.

    Raises ``ValueError`` naming ``path`` if it is missing or not a tokenizer of that type, if
    the tokenizer has no EOS token for the end of documents, or if transformers is missing.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path)
    if tokenizer_type not in (None,) + SENTENCEPIECE_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type}: valid types are {list(TOKENIZER_TYPES)}")
    return SentencePieceTokenizer(path)
