"""Shared inputs of the data tests: a small JSONL corpus and a tokenizer trained on it (once per run)."""

import pytest

from megamoe.data.documents import iter_documents
from megamoe.data.tokenizer_training import train_sentencepiece
from tests.fixtures import make_documents, write_jsonl


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
