"""What several test modules share, in one place (test modules never import each other).

* ``REPO``: the repository root (the tools and ``pretrain_moe.py`` run from it).
* ``TINY_MOE``: the command line of the tiny MoE every end-to-end test trains: ``tiny_moe``'s model
  (2 layers, hidden 32, 4 experts top-2, sequence 16) on mock data, global batch 8.
* ``run_main``: a ``run_distributed`` body that runs ``pretrain_moe.main`` once per argv.
* ``read_json_log``: the records of a ``--log-json`` file.
* ``make_documents``, ``write_jsonl``: small varied text corpora for the data tests.
* ``assert_config_error``: a command line ``parse_config`` refuses with one line.
* ``script_env``: the environment of a script run as a user runs it (``python bench/x.py``): this
  checkout's ``megamoe`` importable, the test package not.
* ``make_hf_tokenizer``: a small Hugging Face tokenizer directory (byte-level BPE trained on the
  given texts, saved with transformers), for --tokenizer-type HuggingFaceTokenizer without network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest

from megamoe.flags import to_argv
from megamoe.model.config import ModelConfig
from tests.tiny_moe import SEQ, TINY_ARCH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model of tests/tiny_moe.py as flags, then what the end-to-end runs add.
TINY_MOE = [
    "--device", "cpu", "--mock-data", "--vocab-size", str(TINY_ARCH["vocab_size"]), "--seq-length", str(SEQ),
    *to_argv(ModelConfig(**TINY_ARCH), exclude=[f.name for f in dataclasses.fields(ModelConfig) if f.name not in TINY_ARCH]),
    "--micro-batch-size", "2", "--global-batch-size", "8",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--clip-grad", "0.5", "--log-interval", "1", "--seed", "7",
]


def read_json_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_main(rank, world, runs):
    """Run pretrain_moe.main once per argv in ``runs`` inside one set of processes."""
    import pretrain_moe

    os.environ["WORLD_SIZE"] = str(world)
    for argv in runs:
        code = pretrain_moe.main(argv)
        assert code == 0, f"main exited with {code}"


_WORDS = "the of and to in is that it for as with was on be by this are model expert token data".split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` varied documents: words, indentation, newlines, non-ASCII, and some empty ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 11 == 5:
            docs.append("")
            continue
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
        text = "\n    ".join(lines)
        if i % 7 == 0:
            text += " naïve 专家 ✓"
        docs.append(text)
    return docs


def write_jsonl(path, docs, key="text", **extra) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({key: doc, "id": i, **{k: v[i] for k, v in extra.items()}}) + "\n")
    return str(path)


def assert_config_error(argv: list[str], world_size: int, match: str) -> None:
    """``parse_config(argv)`` at ``world_size`` raises one ConfigError, a single line matching the regex ``match``."""
    from megamoe.training.arguments import ConfigError, parse_config

    with pytest.raises(ConfigError, match=match) as info:
        parse_config(argv, world_size=world_size)
    assert "\n" not in str(info.value), str(info.value)


def script_env(tmp_path) -> dict:
    """``os.environ`` for running this checkout's scripts as a user would: ``PYTHONPATH`` holds a
    directory with only a ``megamoe`` link to this checkout (what the editable install provides),
    so a script that imports the tests (``No module named 'tests'`` for a user) fails here too."""
    only = tmp_path / "megamoe_only"
    only.mkdir(exist_ok=True)
    link = only / "megamoe"
    if not link.exists():
        link.symlink_to(os.path.join(REPO, "megamoe"))
    return dict(os.environ, PYTHONPATH=str(only), OMP_NUM_THREADS="1")
def make_hf_tokenizer(directory, texts, vocab_size: int = 400) -> str:
    """A byte-level BPE tokenizer trained on ``texts`` with EOS ``<|endoftext|>``, saved by
    transformers into ``directory`` (what AutoTokenizer loads); returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(
        str(directory))
    return str(directory)
