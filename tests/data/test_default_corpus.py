"""The built-in default corpus: built on first use from the standard library, reused after,
and built once when several processes ask at the same time."""

import json
import multiprocessing as mp
import os

import pytest

from megamoe.data.default_corpus import ensure_default_corpus, split_source
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.tokenizer import load_tokenizer


def _mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_ensure_builds_once_then_reuses(tmp_path):
    folder = str(tmp_path / "cache" / "default_corpus")
    prefix, model = ensure_default_corpus(folder)
    assert (prefix, model) == (os.path.join(folder, "stdlib"), os.path.join(folder, "tokenizer.model"))
    tok = load_tokenizer(model)
    data = IndexedDataset(prefix)
    manifest = json.load(open(os.path.join(folder, "corpus.json")))
    assert tok.vocab_size == manifest["vocab_size"] == 4096
    assert len(data) == manifest["documents"] > 500 and data.num_tokens == manifest["tokens"]
    assert manifest["bytes"] < 6 * 2**20
    first = data[0]
    assert first[-1] == tok.eod_id and "from" in tok.decode(first[:-1])
    before = _mtimes(folder)
    assert ensure_default_corpus(folder) == (prefix, model)
    assert _mtimes(folder) == before
    assert sorted(os.listdir(tmp_path / "cache")) == ["default_corpus", "default_corpus.lock"]


def _ensure(folder):
    prefix, model = ensure_default_corpus(folder)
    return prefix, model, len(IndexedDataset(prefix)), load_tokenizer(model).vocab_size


def test_concurrent_first_calls_build_one_complete_corpus(tmp_path):
    folder = str(tmp_path / "dc")
    with mp.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_ensure, [folder, folder])
    assert first == second == (os.path.join(folder, "stdlib"), os.path.join(folder, "tokenizer.model"), first[2], 4096)
    assert sorted(os.listdir(tmp_path)) == ["dc", "dc.lock"]  # no leftover private build folder


def test_a_folder_that_is_not_a_corpus_is_not_overwritten(tmp_path):
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="dc exists but is not a complete default corpus"):
        ensure_default_corpus(str(tmp_path / "dc"))


def test_source_files_are_cut_at_top_level_statements_without_losing_text():
    source = "import os\n\n\ndef f():\n    return 1\n\n\nclass C:\n    x = 1\n\n    def g(self):\n        pass\n\n# tail\n"
    pieces = split_source(source, target_chars=10)
    assert "".join(pieces) == source
    assert [p.split("\n")[0] for p in pieces] == ["import os", "def f():", "class C:"]
