"""Text from a checkpoint: a greedy or sampled continuation of a prompt, the sanity check after
training.

    python tools/generate.py --load ckpt/run1 --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load ckpt/run1/iter_0000500 --prompt "import" --temperature 0.8 --top-k 40 --seed 3

The checkpoint may have been saved in any layout: it is opened and loaded by the trainer's own
loader (``megamoe.training.checkpoint.open_checkpoint``), which reshards it into this one process
(TP 1, EP 1).  The tokenizer is the run's: ``--tokenizer-model`` when given, else the one the run
trained with (its ``--tokenizer-model``, or the built-in corpus's).  ``--temperature 0`` (the
default) is greedy; otherwise each token is drawn from softmax(logits / T), among the
``--top-k`` most likely when given, from a generator seeded with ``--seed``.  Generation stops
after ``--max-new-tokens`` or at the end-of-document token.  Prints the prompt and its
continuation.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from megamoe.checkpointing.format import CheckpointError, model_config_from_dict, read_metadata
from megamoe.data.tokenizer import TOKENIZER_TYPES
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.launch import init_distributed
from megamoe.parallel.mappings import gather_from_tp_region
from megamoe.parallel.state import initialize_model_parallel, resolve_device
from megamoe.training.checkpoint import open_checkpoint

PROG = "generate.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory (its latest) or one iter_XXXXXXX in it")
    p.add_argument("--prompt", default="", help="text to continue (default: none, start from EOD)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece model, or with --tokenizer-type "
                                                           "HuggingFaceTokenizer a tokenizer directory or hub name "
                                                           "(default: the run's)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="Megatron's tokenizer names (default: the run's; sentencepiece)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return p


def run_tokenizer_model(args: dict) -> str:
    """The tokenizer a run trained with, from its saved flags: --tokenizer-model, or the built-in
    corpus's when it gave no --data-path; ``ValueError`` for a --mock-data run (no tokenizer)."""
    if args.get("tokenizer_model"):
        return args["tokenizer_model"]
    if args.get("mock_data"):
        raise ValueError("the run trained on --mock-data, which has no tokenizer: give --tokenizer-model")
    from megamoe.data.default_corpus import ensure_default_corpus

    return ensure_default_corpus()[1]


@torch.no_grad()
def generate(model: GPTModel, prompt_ids: list[int], *, max_new_tokens: int, vocab_size: int, stop_id: int | None,
             temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """``prompt_ids`` continued by up to ``max_new_tokens`` ids (returned without the prompt),
    stopping after ``stop_id``.  Each step runs the whole context (its last
    ``max_position_embeddings`` tokens) through ``model`` and takes the last position's logits
    over the first ``vocab_size`` ids (the rest is padding), gathered over TP: every rank of any
    layout draws the same ids (give each the same ``generator`` seed)."""
    model.eval()
    device = next(model.parameters()).device
    ids, new = list(prompt_ids), []
    window = model.config.max_position_embeddings or len(ids) + max_new_tokens
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)
        logits = gather_from_tp_region(model(context).logits, model.layout)[0, -1, :vocab_size].float().cpu()
        if temperature == 0.0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, vocab_size)).values[-1]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        ids.append(token)
        new.append(token)
        if token == stop_id:
            break
    return new


def load_for_generation(root: str, device: torch.device) -> tuple[GPTModel, dict]:
    """The checkpoint's model in a 1-rank layout (any saved layout reshards into it), its weights in
    fp32 whatever they were trained in, and its metadata."""
    found = read_metadata(root)
    if found is None:
        raise CheckpointError(f"--load {root}: no checkpoint there")
    _, metadata = found
    config = model_config_from_dict(metadata["model_config"])
    init_distributed(device)
    layout = initialize_model_parallel(ParallelConfig(), config.experts_by_layer())
    model = GPTModel(config, layout, device=device).initialize(seed=0)  # then every tensor is overwritten
    open_checkpoint(root, config, layout).load_model(model)
    return model, metadata


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        print(f"{PROG}: error: --max-new-tokens and --top-k must be >= 1, --temperature >= 0", file=sys.stderr)
        return 2
    from megamoe.data.tokenizer import load_tokenizer

    try:
        device = torch.device(resolve_device(args.device))
        model, metadata = load_for_generation(args.load, device)
        tokenizer_model = args.tokenizer_model or run_tokenizer_model(metadata["args"])
        tokenizer_type = args.tokenizer_type or (None if args.tokenizer_model else metadata["args"].get("tokenizer_type"))
        if tokenizer_type != "HuggingFaceTokenizer" and not os.path.isfile(tokenizer_model):
            raise ValueError(f"tokenizer {tokenizer_model} (the run's) does not exist here: give --tokenizer-model")
        tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
        prompt = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eod_id]
        generator = torch.Generator().manual_seed(args.seed)
        new = generate(model, prompt, max_new_tokens=args.max_new_tokens, vocab_size=tokenizer.vocab_size,
                       stop_id=tokenizer.eod_id, temperature=args.temperature, top_k=args.top_k, generator=generator)
    except (CheckpointError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(args.prompt + tokenizer.decode([t for t in new if t != tokenizer.eod_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
