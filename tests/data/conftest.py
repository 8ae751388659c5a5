"""Shared inputs of the data tests: a small JSONL corpus and a tokenizer trained on it (once per run)."""

import json
import random

import pytest

from megamoe.data.documents import iter_documents
from megamoe.data.tokenizer_training import train_sentencepiece

_WORDS = "the of and to in is that it for as with was on be by this are model expert token data".split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` varied documents: words, indentation, newlines, non-ASCII, and some empty ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 11 == 5:
            docs.append("")
            continue
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        text = "\n    ".join(lines)
        if i % 7 == 0:
            text += " naïve 专家 ✓"
        docs.append(text)
    return docs


def write_jsonl(path, docs, key="text", **extra) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({key: doc, "id": i, **{k: v[i] for k, v in extra.items()}}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(path of a 400-document JSONL file, its documents)."""
    docs = make_documents(400)
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", docs), docs


@pytest.fixture(scope="session")
def tokenizer_model(corpus, tmp_path_factory):
    path, _ = corpus
    texts = (t[0] for t in iter_documents([path]))
    return train_sentencepiece(texts, model_prefix=str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=320)


@pytest.fixture(scope="session")
def corpus_prefix(corpus, tokenizer_model, tmp_path_factory):
    """The corpus preprocessed into an indexed dataset (one sequence per non-empty document)."""
    from megamoe.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    preprocess([corpus[0]], tokenizer_model=tokenizer_model, output_prefix=prefix, progress=None)
    return prefix
