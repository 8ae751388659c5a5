"""Tokenize text or JSONL files into a memory-mapped indexed dataset (.bin/.idx) for training.

    python tools/preprocess_data.py --input data/corpus.jsonl --json-keys text \
        --tokenizer-model tok.model --output-prefix data/corpus --workers 8

writes data/corpus.bin and data/corpus.idx; train on it with ``--data-path data/corpus``.
Token ids are stored as uint16 when the vocabulary fits (<= 65536 ids), else int32; each
document ends with the tokenizer's EOD id unless --no-append-eod.  Output is byte-identical for
any --workers.  See megamoe/data/documents.py for the input formats.
"""

import argparse
import sys

from megamoe.data.documents import INPUT_FORMATS
from megamoe.data.preprocess import format_summary, preprocess
from megamoe.data.tokenizer import TOKENIZER_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (quote globs), read in this order")
    parser.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                        help="auto: jsonl for .json/.jsonl[.gz], else one document per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON keys holding the text; several keys write one dataset each (PREFIX_KEY)")
    parser.add_argument("--tokenizer-model", required=True,
                        help="sentencepiece .model file, or with --tokenizer-type HuggingFaceTokenizer a Hugging "
                             "Face tokenizer directory or hub name")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                        help="Megatron's tokenizer names (default: sentencepiece)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the EOD token (default: on)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        stats = preprocess(
            args.input,
            tokenizer_model=args.tokenizer_model,
            tokenizer_type=args.tokenizer_type,
            output_prefix=args.output_prefix,
            json_keys=args.json_keys,
            input_format=args.input_format,
            append_eod=args.append_eod,
            workers=args.workers,
        )
    except ValueError as err:
        sys.exit(f"preprocess_data.py: error: {err}")
    print(format_summary(stats))


if __name__ == "__main__":
    main()
