"""Reading documents out of text and JSONL files, in a fixed order.

Formats (``--input-format``):

* ``jsonl``: one JSON object per line; each ``--json-keys`` key holds a string (one document
  per line and key).  A line that is not JSON, or lacks a key, is an error naming file:line.
* ``lines``: every line of a text file is one document.
* ``files``: every file is one document (e.g. source files).
* ``auto`` (default): ``jsonl`` for ``.json``/``.jsonl`` (optionally ``.gz``), else ``lines``.

Reading is split in two so that parsing can run in worker processes: ``iter_raw_records``
yields unparsed records cheaply in input order, ``parse_record`` turns one into its texts.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator

INPUT_FORMATS = ("auto", "jsonl", "lines", "files")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths and globs -> the list of files, in argument order (each glob sorted).

    Raises ValueError naming ``--input`` for an empty list or a pattern matching no file.
    """
    if not patterns:
        raise ValueError("--input: give at least one file or glob")
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"--input {pattern}: no such file")
        paths.extend(matches)
    return paths


def resolve_format(path: str, input_format: str) -> str:
    """The concrete format (``jsonl``/``lines``/``files``) used for ``path``."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"--input-format {input_format}: choose one of {', '.join(INPUT_FORMATS)}")
    if input_format != "auto":
        return input_format
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "lines"


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_raw_records(path: str, fmt: str) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` of ``path`` in ``fmt`` (a resolved format), undecoded.

    Lines come without their line ending; for ``files`` the whole file is one record at line 1.
    Staying in bytes keeps the reading process cheap (decoding happens in ``parse_record``,
    possibly in a worker) and lets the caller count bytes exactly for progress.
    """
    with _open_binary(path) as f:
        if fmt == "files":
            yield 1, f.read()
            return
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\r\n")


def parse_record(raw: bytes, fmt: str, json_keys: tuple[str, ...], where: str) -> list[str]:
    """The texts of one record: one per ``json_keys`` key for ``jsonl``, else ``[text]``.

    ``where`` ("file:line") goes into the ValueError for text that is not UTF-8, a malformed
    JSON line, or a missing or non-string key.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if fmt != "jsonl":
        return [text]
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON line ({err.msg}); is --input-format right?") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON line must be an object with the --json-keys keys")
    texts = []
    for key in json_keys:
        value = record.get(key)
        if not isinstance(value, str):
            problem = "missing" if key not in record else f"of type {type(value).__name__}, not a string"
            raise ValueError(f"{where}: key {key!r} is {problem} (--json-keys)")
        texts.append(value)
    return texts


def iter_documents(paths: list[str], *, input_format: str = "auto", json_keys=("text",)) -> Iterator[list[str]]:
    """Every document of ``paths`` in order, as one text per key (one text for non-JSON input)."""
    for path in paths:
        fmt = resolve_format(path, input_format)
        for number, raw in iter_raw_records(path, fmt):
            yield parse_record(raw, fmt, tuple(json_keys), f"{path}:{number}")
