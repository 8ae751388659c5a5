"""Data pipeline throughput: preprocessing tokens/s per worker next to raw sentencepiece speed.

    python bench/bench_data.py                          # the default corpus (built on first use)
    python bench/bench_data.py --input data/*.jsonl --tokenizer-model tok.model --workers 1 2 4

Prints, on the same text:
  * raw sentencepiece: one thread encoding the already-decoded texts in one batched call, the
    limit a worker could reach;
  * tools/preprocess_data.py's engine at each --workers: total tokens/s, tokens/s per worker,
    and per-worker speed as a fraction of raw (the pipeline's overhead: reading, JSON, batching,
    writing, process hand-off);
  * sample reading: GPT samples/s and tokens/s through micro_batches (one DP rank of one).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megamoe.data.build import DataConfig, build_train_valid_test_datasets, micro_batches  # noqa: E402
from megamoe.data.default_corpus import ensure_default_corpus  # noqa: E402
from megamoe.data.documents import expand_inputs, iter_documents  # noqa: E402
from megamoe.data.preprocess import preprocess  # noqa: E402
from megamoe.data.tokenizer import load_tokenizer  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="JSONL/text files (default: the default corpus's stdlib.jsonl)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-model", help="default: the default corpus's tokenizer")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeat", type=int, default=3, help="the input is read this many times per run")
    parser.add_argument("--seq-length", type=int, default=1024)
    return parser.parse_args()


def raw_sentencepiece(paths, json_keys, model, repeat):
    """Tokens/s of one thread encoding the texts (already read and parsed) in one batched call."""
    texts = [t for texts in iter_documents(paths, json_keys=json_keys) for t in texts] * repeat
    tok = load_tokenizer(model)
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens, time.perf_counter() - start


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

    tokens, seconds = raw_sentencepiece(paths[: len(paths) // args.repeat], args.json_keys, model, args.repeat)
    raw = tokens / seconds
    print(f"raw sentencepiece, 1 thread: {raw:>12,.0f} tokens/s  ({tokens:,} tokens in {seconds:.2f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'workers':>8} {'tokens/s':>12} {'per worker':>12} {'vs raw':>7} {'docs/s':>10}")
        for workers in args.workers:
            stats = preprocess(paths, tokenizer_model=model, output_prefix=os.path.join(tmp, f"w{workers}"),
                               json_keys=args.json_keys, workers=workers, progress=None)
            rate = stats.tokens / stats.seconds
            print(f"{workers:>8} {rate:>12,.0f} {rate / workers:>12,.0f} {rate / workers / raw:>7.0%} "
                  f"{stats.records / stats.seconds:>10,.0f}")

        data_prefix = next(iter(stats.outputs))
        config = DataConfig([data_prefix], split="100,0,0", cache_dir=os.path.join(tmp, "cache"))
        start = time.perf_counter()
        train, _, _ = build_train_valid_test_datasets(config, train_samples=4096, valid_samples=0, test_samples=0,
                                                      seq_length=args.seq_length, seed=0)
        built = time.perf_counter() - start
        start = time.perf_counter()
        batches = sum(1 for _ in micro_batches(train, global_batch_size=64, micro_batch_size=8, dp_rank=0, dp_size=1))
        seconds = time.perf_counter() - start
        samples = batches * 64
        print(f"samples (seq {args.seq_length}): index built in {built:.2f} s; read {samples / seconds:,.0f} samples/s, "
              f"{samples * args.seq_length / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
