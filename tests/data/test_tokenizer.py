"""Tokenizer: exact round trip, the special ids, and refusals that name the file."""

import os

import pytest

from megamoe.data.documents import iter_documents
from megamoe.data.tokenizer import load_tokenizer
from megamoe.data.tokenizer_training import train_sentencepiece


def test_decode_inverts_encode_including_whitespace_and_unseen_characters(tokenizer_model, corpus):
    tok = load_tokenizer(tokenizer_model)
    _, docs = corpus
    samples = docs[:20] + ["  two  spaces\n\n\ttab and trailing   ", "never seen: Ωμέγα 🙂 \x01"]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]


def test_special_ids_follow_the_training_convention(tokenizer_model):
    tok = load_tokenizer(tokenizer_model)
    assert tok.vocab_size == 320
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.eod_id == tok.eos_id
    assert tok.eod_id not in tok.encode("the model of the data")


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", b"\x0a\x00"])
def test_a_file_that_is_not_a_sentencepiece_model_is_refused_by_name(tmp_path, content):
    path = tmp_path / "bogus.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bogus.model.*not a sentencepiece model"):
        load_tokenizer(str(path))


def test_a_missing_model_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="absent.model: no such file"):
        load_tokenizer(str(tmp_path / "absent.model"))


def test_training_errors_name_the_flag_and_leave_no_model(tmp_path, corpus):
    path, _ = corpus
    prefix = str(tmp_path / "t")
    texts = [t[0] for t in iter_documents([path])]
    with pytest.raises(ValueError, match="--vocab-size 100"):
        train_sentencepiece(texts, model_prefix=prefix, vocab_size=100)
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_sentencepiece(texts, model_prefix=prefix, vocab_size=60000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: key 'text' is missing"):
        train_sentencepiece((t[0] for t in iter_documents([str(bad)])), model_prefix=prefix, vocab_size=300)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(corpus, tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.fixtures import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"), corpus[1][:200])


def test_a_hugging_face_tokenizer_gives_its_own_ids_vocabulary_and_eod(hf_tokenizer_dir, corpus):
    """--tokenizer-type HuggingFaceTokenizer: AutoTokenizer's ids; the vocabulary counts every id
    (len(tokenizer), added tokens included, as Megatron's) and EOD is its EOS token."""
    import pickle

    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok = load_tokenizer(hf_tokenizer_dir, "HuggingFaceTokenizer")
    assert tok.vocab_size == len(reference) and tok.eod_id == reference.convert_tokens_to_ids("<|endoftext|>")
    docs = [d for d in corpus[1][:20] if d]
    assert tok.encode_batch(docs) == [reference(d)["input_ids"] for d in docs]
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    again = pickle.loads(pickle.dumps(tok))  # what preprocessing workers receive
    assert again.encode(docs[0]) == tok.encode(docs[0])


def test_hugging_face_tokenizer_errors_name_the_flag(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=f"--tokenizer-model {tmp_path}: not a Hugging Face tokenizer directory"):
        load_tokenizer(str(tmp_path), "HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type GPT2BPETokenizer: valid types are"):
        load_tokenizer(str(tmp_path), "GPT2BPETokenizer")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if not installed
    with pytest.raises(ValueError, match=r"HuggingFaceTokenizer needs the transformers package: pip install 'megamoe\[hf\]'"):
        load_tokenizer(str(tmp_path), "HuggingFaceTokenizer")
