"""The built-in default corpus: this machine's Python standard library source, tokenized.

It needs no download and ships no text in the repository: the first call of
``ensure_default_corpus`` takes the standard library's ``.py`` files (top-level modules in
alphabetical order, then packages; tests, codec tables and site-packages left out) up to about 4 MiB of text, cuts each file into documents of about 2 KiB at top-level
statements (some 900 documents, so that even a 0.1% test split gets one), trains a 4096-piece
BPE sentencepiece tokenizer on them and preprocesses them into

    cache/default_corpus/stdlib.jsonl        the documents, {"text": ..., "source": file}
    cache/default_corpus/tokenizer.model     the tokenizer (--tokenizer-model)
    cache/default_corpus/stdlib.bin/.idx     the dataset (--data-path cache/default_corpus/stdlib)
    cache/default_corpus/corpus.json         what went in (Python version, files, tokens)

which takes a few seconds; later calls only check that the folder is there.  It is a smoke
test corpus (about 1.3 M tokens of Python code), good for seeing a loss fall, not for a model.
With a different Python version the files, and so the corpus, differ; on several nodes, build
it once on shared storage.  For real data, train a tokenizer and preprocess your own JSONL
(tools/train_tokenizer.py, tools/preprocess_data.py) and pass --data-path/--tokenizer-model.

Concurrent callers are safe: one process per machine builds under a file lock, and the build
happens in a private folder renamed into place only when complete, so other machines sharing
the folder see either nothing or a complete corpus.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import socket
import sysconfig
from contextlib import contextmanager

from megamoe.data.documents import iter_documents
from megamoe.data.preprocess import preprocess
from megamoe.data.tokenizer_training import train_sentencepiece

DEFAULT_CACHE_DIR = "cache/default_corpus"
MAX_TEXT_BYTES = 4 * 2**20
DOCUMENT_CHARS = 2048
VOCAB_SIZE = 4096
DATA_NAME = "stdlib"
TOKENIZER_NAME = "tokenizer"
MANIFEST = "corpus.json"
# Third-party code, tests, and generated tables (codecs, build config) are not the code we want.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo",
                 "encodings", "pydoc_data", "ensurepip", "__phello__"}


def stdlib_source_files(max_bytes: int = MAX_TEXT_BYTES) -> list[str]:
    """The standard library's UTF-8 ``.py`` files, top-level modules first then packages, each
    group in path order, up to the first that brings the total to ``max_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        found.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
    chosen, total = [], 0
    for path in sorted(found, key=lambda p: (os.sep in os.path.relpath(p, root), os.path.relpath(p, root))):
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append(path)
        total += len(data)
        if total >= max_bytes:
            break
    return chosen


def _paths(cache_dir: str) -> tuple[str, str]:
    return os.path.join(cache_dir, DATA_NAME), os.path.join(cache_dir, TOKENIZER_NAME + ".model")


def _is_complete(cache_dir: str) -> bool:
    prefix, model = _paths(cache_dir)
    return all(os.path.isfile(p) for p in (f"{prefix}.bin", f"{prefix}.idx", model, os.path.join(cache_dir, MANIFEST)))


@contextmanager
def _file_lock(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def split_source(text: str, target_chars: int = DOCUMENT_CHARS) -> list[str]:
    """Cut a source file into documents of at least ``target_chars`` (except the last), only
    where a top-level statement starts after a blank line; the pieces concatenate to ``text``
    (blank-only pieces dropped)."""
    pieces, start = [], 0
    for boundary in re.finditer(r"\n\n(?=[^\s#])", text):
        if boundary.end() - start >= target_chars:
            pieces.append(text[start : boundary.end()])
            start = boundary.end()
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _build(folder: str) -> None:
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_source_files()
    os.makedirs(folder)
    jsonl = os.path.join(folder, DATA_NAME + ".jsonl")
    with open(jsonl, "w", encoding="utf-8") as out:
        for path in files:
            with open(path, encoding="utf-8") as f:
                for piece in split_source(f.read()):
                    out.write(json.dumps({"text": piece, "source": os.path.relpath(path, root)}) + "\n")
    documents = (texts[0] for texts in iter_documents([jsonl]))
    model = train_sentencepiece(documents, model_prefix=os.path.join(folder, TOKENIZER_NAME), vocab_size=VOCAB_SIZE)
    prefix, _ = _paths(folder)
    stats = preprocess([jsonl], tokenizer_model=model, output_prefix=prefix, progress=None)
    manifest = {
        "what": "Python standard library source files, cut into documents at top-level statements",
        "python": platform.python_version(),
        "stdlib": root,
        "files": len(files),
        "bytes": stats.bytes_read,
        "documents": stats.outputs[prefix][0],
        "tokens": stats.tokens,
        "vocab_size": VOCAB_SIZE,
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def ensure_default_corpus(cache_dir: str = DEFAULT_CACHE_DIR) -> tuple[str, str]:
    """Build the default corpus in ``cache_dir`` unless it is there; return (data prefix, tokenizer model path).

    Idempotent and safe to call from several processes at once.  Raises ValueError if
    ``cache_dir`` exists but is not a complete default corpus (remove it to rebuild).
    """
    if not _is_complete(cache_dir):
        parent = os.path.dirname(os.path.abspath(cache_dir))
        os.makedirs(parent, exist_ok=True)
        with _file_lock(os.path.abspath(cache_dir) + ".lock"):
            if not _is_complete(cache_dir):
                if os.path.exists(cache_dir):
                    raise ValueError(f"{cache_dir} exists but is not a complete default corpus; remove it to rebuild")
                private = f"{os.path.abspath(cache_dir)}.tmp-{socket.gethostname()}-{os.getpid()}"
                shutil.rmtree(private, ignore_errors=True)
                try:
                    _build(private)
                    os.rename(private, cache_dir)
                except OSError:
                    # Another machine renamed its complete copy into place first.
                    if not _is_complete(cache_dir):
                        raise
                finally:
                    shutil.rmtree(private, ignore_errors=True)
    return _paths(cache_dir)
