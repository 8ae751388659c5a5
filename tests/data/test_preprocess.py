"""Preprocessing: the .bin holds exactly the tokenizer's ids plus EOD per non-empty document,
any number of workers writes the same bytes, and bad input is refused by file:line."""

import filecmp
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from megamoe.data import preprocess as preprocess_module
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.preprocess import preprocess
from megamoe.data.tokenizer import load_tokenizer
from tests.fixtures import REPO, make_documents, script_env, write_jsonl


def _expected_documents(tok, docs, append_eod=True):
    out = []
    for doc in docs:
        ids = tok.encode(doc)
        if ids:
            out.append(ids + [tok.eod_id] * append_eod)
    return out


@pytest.mark.parametrize("append_eod", [True, False])
def test_each_document_is_its_token_ids_then_eod_and_empty_ones_are_skipped(tmp_path, corpus, tokenizer_model, append_eod):
    path, docs = corpus
    stats = preprocess([path], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "c"),
                       append_eod=append_eod, progress=None)
    tok = load_tokenizer(tokenizer_model)
    expected = _expected_documents(tok, docs, append_eod)
    ds = IndexedDataset(str(tmp_path / "c"))
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert stats.records == len(docs) and stats.skipped_empty == docs.count("")
    assert stats.tokens == sum(map(len, expected))


def test_several_workers_write_the_same_bytes_as_one(tmp_path, tokenizer_model, monkeypatch):
    # Small batches so that many batches are in flight across workers and must be reordered.
    monkeypatch.setattr(preprocess_module, "BATCH_RECORDS", 7)
    first = write_jsonl(tmp_path / "a.jsonl", make_documents(300, seed=1))
    second = write_jsonl(tmp_path / "b.jsonl", make_documents(200, seed=2))
    for workers in (1, 3):
        preprocess([first, second], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / f"w{workers}"),
                   workers=workers, progress=None)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"w1{ext}", tmp_path / f"w3{ext}", shallow=False)


def test_inputs_are_read_in_argument_order_with_globs_sorted(tmp_path, tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    for name, text in (("b1.txt", "data b one\ndata b two"), ("b0.txt", "data b zero"), ("a.txt", "data a")):
        (tmp_path / name).write_text(text + "\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write('{"text": "gz doc"}\n')
    preprocess([str(tmp_path / "b*.txt"), str(tmp_path / "z.jsonl.gz"), str(tmp_path / "a.txt")],
               tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "o"), progress=None)
    ds = IndexedDataset(str(tmp_path / "o"))
    texts = ["data b zero", "data b one", "data b two", "gz doc", "data a"]
    assert [tok.decode(ds[i][:-1]) for i in range(len(ds))] == texts


def test_several_json_keys_write_one_dataset_each(tmp_path, tokenizer_model):
    docs = make_documents(30, seed=3)
    path = write_jsonl(tmp_path / "k.jsonl", docs, key="text", title=[d[:10] for d in docs])
    preprocess([path], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "k"),
               json_keys=["text", "title"], progress=None)
    tok = load_tokenizer(tokenizer_model)
    for key, texts in (("text", docs), ("title", [d[:10] for d in docs])):
        ds = IndexedDataset(str(tmp_path / f"k_{key}"))
        assert [ds[i].tolist() for i in range(len(ds))] == _expected_documents(tok, texts)


def test_the_dtype_follows_the_vocabulary(tmp_path, corpus, tokenizer_model, monkeypatch):
    path, docs = corpus
    monkeypatch.setattr(preprocess_module, "best_dtype", lambda vocab_size: np.int32)
    preprocess([path], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "i"), progress=None)
    ds = IndexedDataset(str(tmp_path / "i"))
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == _expected_documents(load_tokenizer(tokenizer_model), docs)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "line,message",
    [
        ("not json at all", r"bad\.jsonl:3: not a JSON line"),
        ('{"body": "x"}', r"bad\.jsonl:3: key 'text' is missing"),
        ('{"text": 5}', r"bad\.jsonl:3: key 'text' is of type int, not a string"),
        ('["text"]', r"bad\.jsonl:3: a JSON line must be an object"),
    ],
)
def test_bad_input_lines_are_refused_by_file_and_line_and_leave_no_output(tmp_path, tokenizer_model, line, message, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        preprocess([str(bad)], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "out"),
                   workers=workers, progress=None)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_flag_errors_name_the_flag(tmp_path, corpus, tokenizer_model):
    path, _ = corpus
    with pytest.raises(ValueError, match="--input .*missing-\\*.jsonl: no such file"):
        preprocess([str(tmp_path / "missing-*.jsonl")], tokenizer_model=tokenizer_model, output_prefix="x", progress=None)
    with pytest.raises(ValueError, match="--workers 0"):
        preprocess([path], tokenizer_model=tokenizer_model, output_prefix="x", workers=0, progress=None)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt:1: not UTF-8"):
        preprocess([str(tmp_path / "latin1.txt")], tokenizer_model=tokenizer_model, output_prefix=str(tmp_path / "l"),
                   progress=None)


def test_command_line_tools_train_a_tokenizer_and_preprocess_with_a_summary(tmp_path, corpus):
    path, docs = corpus
    env = script_env(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                                       env=env)
    trained = run(os.path.join(REPO, "tools/train_tokenizer.py"), "--input", path, "--model-prefix", "tok",
                  "--vocab-size", "300", "--model-type", "unigram")
    assert trained.returncode == 0, trained.stderr
    done = run(os.path.join(REPO, "tools/preprocess_data.py"), "--input", path, "--tokenizer-model", "tok.model",
               "--output-prefix", "data/c", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert f"read {len(docs)} documents" in done.stdout and "tokens/s" in done.stdout
    assert "docs/s" in done.stderr  # the progress line
    assert len(IndexedDataset(str(tmp_path / "data/c"))) == len(docs) - docs.count("")
    failed = run(os.path.join(REPO, "tools/preprocess_data.py"), "--input", path, "--tokenizer-model", "nope.model",
                 "--output-prefix", "x")
    assert failed.returncode != 0 and "nope.model: no such file" in failed.stderr


def test_preprocess_data_reads_a_hugging_face_tokenizer(tmp_path, corpus):
    """tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer: each document is the
    tokenizer's ids then its EOS, the vocabulary decides the dtype."""
    pytest.importorskip("transformers")
    from tests.fixtures import make_hf_tokenizer

    path, docs = corpus
    tok_dir = make_hf_tokenizer(tmp_path / "tok", docs[:200])
    done = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", path, "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model", tok_dir, "--output-prefix",
                           str(tmp_path / "c"), "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=script_env(tmp_path))
    assert done.returncode == 0, done.stderr
    tok = load_tokenizer(tok_dir, "HuggingFaceTokenizer")
    ds = IndexedDataset(str(tmp_path / "c"))
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == _expected_documents(tok, docs)
