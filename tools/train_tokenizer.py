"""Train a sentencepiece tokenizer on text or JSONL files.

    python tools/train_tokenizer.py --input data/corpus.jsonl --json-keys text \
        --model-prefix data/tok --vocab-size 32000

writes data/tok.model (pass it as --tokenizer-model) and data/tok.vocab.  Ids: unk 0, bos 1,
eos 2 (the end-of-document token), pad 3.  Every non-blank line of every document is a training
sentence; at most --sample-sentences of them (a uniform sample) are held in memory, so any
corpus size is safe, but the whole input is read once: pass a subset of the files to save time.
"""

import argparse
import sys

from megamoe.data.documents import INPUT_FORMATS, expand_inputs, iter_documents
from megamoe.data.tokenizer_training import MODEL_TYPES, train_sentencepiece


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (quote globs)")
    parser.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                        help="auto: jsonl for .json/.jsonl[.gz], else one document per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding the text")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", default="bpe", choices=MODEL_TYPES)
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="fraction of characters covered by pieces (0.9995 suits CJK-heavy text)")
    parser.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                        help="encode unknown characters as UTF-8 byte pieces instead of <unk> (default: on)")
    parser.add_argument("--sample-sentences", type=int, default=2_000_000,
                        help="most training sentences (lines) held in memory, uniformly sampled")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        documents = (
            "\n".join(texts)
            for texts in iter_documents(expand_inputs(args.input), input_format=args.input_format, json_keys=args.json_keys)
        )
        path = train_sentencepiece(
            documents,
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            sample_sentences=args.sample_sentences,
            quiet=not args.verbose,
        )
    except ValueError as err:
        sys.exit(f"train_tokenizer.py: error: {err}")
    print(f"wrote {path} and {args.model_prefix}.vocab")


if __name__ == "__main__":
    main()
