"""Data pipeline throughput: preprocessing tokens/s per worker next to raw sentencepiece speed.

    python bench/bench_data.py                          # the default corpus (built on first use)
    python bench/bench_data.py --input data/*.jsonl --tokenizer-model tok.model --workers 1 2 4

Prints, on the same text:
  * raw sentencepiece: one thread encoding the already-decoded texts in one batched call, the
    limit a worker could reach;
  * tools/preprocess_data.py's engine at each --workers: total tokens/s (wall clock, worker
    start-up included), tokens/s per worker, and tokens per CPU-second of all its processes as
    a fraction of raw's: the pipeline's overhead (reading, JSON, batching, writing, process
    hand-off), a figure that stays meaningful on a machine shared with other jobs;
  * sample reading: GPT samples/s and tokens/s through micro_batches (one DP rank of one).
"""

import argparse
import os
import resource
import sys
import tempfile
import time

from megamoe.data.default_corpus import ensure_default_corpus
from megamoe.data.documents import expand_inputs, iter_documents
from megamoe.data.preprocess import preprocess
from megamoe.data.tokenizer import load_tokenizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="JSONL/text files (default: the default corpus's stdlib.jsonl)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-model", help="default: the default corpus's tokenizer")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeat", type=int, default=5, help="the input is read this many times per run")
    parser.add_argument("--seq-length", type=int, default=1024)
    return parser.parse_args()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_sentencepiece(paths, json_keys, model, repeat):
    """(tokens, wall s, CPU s) of one thread encoding the texts, already read and parsed, in one call."""
    texts = [t for texts in iter_documents(paths, json_keys=json_keys) for t in texts] * repeat
    tok = load_tokenizer(model)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens, time.perf_counter() - start, cpu_seconds() - cpu


def main():
    args = parse_args()
    if args.input:
        if not args.tokenizer_model:
            sys.exit("bench_data.py: error: --input needs --tokenizer-model")
        paths, model = expand_inputs(args.input), args.tokenizer_model
    else:
        prefix, model = ensure_default_corpus()
        paths = [prefix + ".jsonl"]
    paths = paths * args.repeat
    size = sum(os.path.getsize(p) for p in paths)
    print(f"input: {len(paths)} files ({size / 2**20:.1f} MiB), tokenizer {model}, {os.cpu_count()} CPUs")

    tokens, seconds, cpu = raw_sentencepiece(paths[: len(paths) // args.repeat], args.json_keys, model, args.repeat)
    raw_cpu = tokens / cpu
    print(f"raw sentencepiece, 1 thread: {tokens / seconds:,.0f} tokens/s, {raw_cpu:,.0f} tokens per CPU-s "
          f"({tokens:,} tokens)")

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'workers':>8} {'tokens/s':>12} {'per worker':>12} {'per CPU-s':>12} {'vs raw':>7} {'docs/s':>10}")
        for workers in args.workers:
            cpu = cpu_seconds()
            stats = preprocess(paths, tokenizer_model=model, output_prefix=os.path.join(tmp, f"w{workers}"),
                               json_keys=args.json_keys, workers=workers, progress=None)
            per_cpu = stats.tokens / (cpu_seconds() - cpu)
            rate = stats.tokens / stats.seconds
            print(f"{workers:>8} {rate:>12,.0f} {rate / workers:>12,.0f} {per_cpu:>12,.0f} {per_cpu / raw_cpu:>7.0%} "
                  f"{stats.records / stats.seconds:>10,.0f}")

        read_samples(next(iter(stats.outputs)), os.path.join(tmp, "cache"), args.seq_length)


def read_samples(data_prefix: str, cache_dir: str, seq_length: int) -> None:
    # Imported here, not at the top: spawned preprocessing workers re-import this file, and
    # they should not pay for importing torch.
    from megamoe.data.build import DataConfig, build_train_valid_test_datasets, micro_batches

    config = DataConfig([data_prefix], split="100,0,0", cache_dir=cache_dir)
    start = time.perf_counter()
    train, _, _ = build_train_valid_test_datasets(config, train_samples=4096, valid_samples=0, test_samples=0,
                                                  seq_length=seq_length, seed=0)
    built = time.perf_counter() - start
    start = time.perf_counter()
    batches = sum(1 for _ in micro_batches(train, global_batch_size=64, micro_batch_size=8, dp_rank=0, dp_size=1))
    seconds = time.perf_counter() - start
    samples = batches * 64
    print(f"samples (seq {seq_length}): index built in {built:.2f} s; read {samples / seconds:,.0f} samples/s, "
          f"{samples * seq_length / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
