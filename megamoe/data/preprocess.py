"""Text / JSONL -> indexed datasets (the engine behind tools/preprocess_data.py).

The reading process only splits the input into raw byte records and batches them; workers
decode, parse and tokenize a batch each and return its token ids as one buffer.  Batches are
written strictly in input order (a bounded window of in-flight batches keeps memory flat on
inputs of any size), so the output is byte-identical for every ``workers`` value.

Each document becomes one sequence of its token ids followed by EOD (``append_eod``);
documents with no tokens are skipped and counted.  With several ``json_keys`` each key gets its
own dataset ``{output_prefix}_{key}``; with one key the dataset is ``{output_prefix}``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megamoe.data.documents import expand_inputs, iter_raw_records, parse_record, resolve_format
from megamoe.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megamoe.data.tokenizer import Tokenizer, load_tokenizer

BATCH_RECORDS = 1024
BATCH_BYTES = 1 << 18
IN_FLIGHT_PER_WORKER = 4


@dataclass
class PreprocessStats:
    """What a run did; ``outputs`` maps each dataset prefix to (documents, tokens) written."""

    records: int = 0
    skipped_empty: int = 0
    tokens: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    dtype: str = ""
    outputs: dict = field(default_factory=dict)


class _Encoder:
    """Turns one batch ``(path, fmt, [(line, raw bytes), ...])`` into, per key, the bytes of its
    documents' token ids and their lengths (plus the number of empty documents skipped)."""

    def __init__(self, tokenizer: Tokenizer, json_keys: tuple[str, ...], append_eod: bool, dtype):
        # A spawned worker gets ``tokenizer`` pickled: the tokenizers reload themselves from their path.
        self.tokenizer = tokenizer
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.dtype = np.dtype(dtype)

    def __call__(self, batch):
        path, fmt, records = batch
        columns = list(zip(*(parse_record(raw, fmt, self.json_keys, f"{path}:{n}") for n, raw in records)))
        out = []
        for texts in columns:
            flat, lengths, skipped = [], [], 0
            for ids in self.tokenizer.encode_batch(list(texts)):
                if not ids:
                    skipped += 1
                    continue
                flat.extend(ids)
                if self.append_eod:
                    flat.append(self.tokenizer.eod_id)
                lengths.append(len(ids) + self.append_eod)
            out.append((np.asarray(flat, dtype=self.dtype).tobytes(), lengths, skipped))
        return out


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*args)


def _encode_in_worker(batch):
    return _WORKER_ENCODER(batch)


def _batches(paths: list[str], input_format: str):
    """Yield ``((path, fmt, records), raw_bytes)`` batches in input order; a batch never spans files."""
    for path in paths:
        fmt = resolve_format(path, input_format)
        records, size = [], 0
        for number, raw in iter_raw_records(path, fmt):
            records.append((number, raw))
            size += len(raw) + 1
            if len(records) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield (path, fmt, records), size
                records, size = [], 0
        if records:
            yield (path, fmt, records), size


class _Progress:
    """Documents/s and tokens/s on one refreshed line (a terminal) or a line every 10 s (a log)."""

    def __init__(self, stream, total_bytes: int | None):
        self.stream = stream
        self.total_bytes = total_bytes
        self.tty = stream is not None and stream.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.start = self.last = time.perf_counter()

    def update(self, stats: PreprocessStats, final: bool = False) -> None:
        now = time.perf_counter()
        if self.stream is None or (not final and now - self.last < self.interval):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        percent = ""
        if self.total_bytes:
            done = min(stats.bytes_read / self.total_bytes, 1.0)
            bar = "#" * int(done * 20)
            percent = f"[{bar:<20}] {100 * done:5.1f}% "
        line = (
            f"{percent}{stats.records:,} docs ({stats.records / elapsed:,.0f} docs/s), "
            f"{stats.tokens:,} tokens ({stats.tokens / elapsed:,.0f} tokens/s), "
            f"{stats.bytes_read / elapsed / 2**20:.1f} MiB/s"
        )
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def preprocess(
    inputs: list[str],
    *,
    tokenizer_model: str,
    tokenizer_type: str | None = None,
    output_prefix: str,
    json_keys=("text",),
    input_format: str = "auto",
    append_eod: bool = True,
    workers: int = 1,
    progress=sys.stderr,
) -> PreprocessStats:
    """Tokenize every document of ``inputs`` (paths or globs) into indexed datasets.

    ``progress``: a text stream for the progress line, or None for silence.  Returns the
    statistics of the run; raises ValueError naming the flag or the file:line at fault, in
    which case no output file is left behind.
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    json_keys = tuple(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys {' '.join(json_keys)}: give one or more distinct keys")
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = [output_prefix] if len(json_keys) == 1 else [f"{output_prefix}_{k}" for k in json_keys]
    stats = PreprocessStats(dtype=np.dtype(dtype).name)
    plain = not any(p.endswith(".gz") for p in paths)
    bar = _Progress(progress, sum(os.path.getsize(p) for p in paths) if plain else None)
    encoder_args = (tokenizer, json_keys, append_eod, dtype)
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    try:
        if workers == 1:
            encoder = _Encoder(*encoder_args)
            results = ((encoder(batch), size) for batch, size in _batches(paths, input_format))
            _write_all(results, writers, stats, bar)
        else:
            # spawn, not fork: the caller may hold threads (torch, sentencepiece) that fork would break.
            with mp.get_context("spawn").Pool(workers, _init_worker, encoder_args) as pool:
                _write_all(_ordered(pool, _batches(paths, input_format), workers), writers, stats, bar)
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    for writer in writers:
        writer.finish()
        stats.outputs[writer.prefix] = (writer.num_documents, writer.num_tokens)
    stats.seconds = time.perf_counter() - bar.start
    bar.update(stats, final=True)
    return stats


def _ordered(pool, batches, workers: int):
    """Results of ``batches`` in submission order, at most IN_FLIGHT_PER_WORKER x workers pending.

    (``Pool.imap`` would also keep order, but it reads its whole input ahead into memory.)
    """
    pending = deque()
    for batch, size in batches:
        pending.append((pool.apply_async(_encode_in_worker, (batch,)), size))
        if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
            result, done_size = pending.popleft()
            yield result.get(), done_size
    while pending:
        result, done_size = pending.popleft()
        yield result.get(), done_size


def _write_all(results, writers, stats: PreprocessStats, bar: _Progress) -> None:
    for per_key, size in results:
        for writer, (data, lengths, skipped) in zip(writers, per_key):
            writer.add_documents(data, lengths)
            stats.tokens += sum(lengths)
            stats.skipped_empty += skipped
        stats.records += len(per_key[0][1]) + per_key[0][2]
        stats.bytes_read += size
        bar.update(stats)


def format_summary(stats: PreprocessStats) -> str:
    """The end-of-run summary printed by tools/preprocess_data.py."""
    seconds = max(stats.seconds, 1e-9)
    lines = [
        f"read {stats.records:,} documents ({stats.bytes_read / 2**20:,.1f} MiB) in {stats.seconds:.1f} s: "
        f"{stats.records / seconds:,.0f} docs/s, {stats.tokens / seconds:,.0f} tokens/s",
        f"skipped {stats.skipped_empty:,} empty documents; token dtype {stats.dtype}",
    ]
    for prefix, (docs, tokens) in stats.outputs.items():
        mean = tokens / docs if docs else 0.0
        lines.append(f"wrote {prefix}.bin/.idx: {docs:,} documents, {tokens:,} tokens ({mean:,.1f} per document)")
    return "\n".join(lines)
