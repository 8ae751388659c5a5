"""tools/generate.py: text from a checkpoint saved in another layout, with the run's tokenizer.
A tiny MoE trains on the built-in corpus at TP 2 and saves; the tool (one process, TP 1, run as a
script) continues a prompt greedily and by sampling, and gives the same ids as the same function
on the checkpoint loaded at TP 2 (the loader reshards; the logits are gathered over TP)."""

import importlib.util
import os
import subprocess
import sys

import torch

from tests.fixtures import REPO, TINY_MOE, script_env
from tests.harness import init_layout, run_distributed

PROMPT = "def main("
ARGS = [a for a in TINY_MOE if a not in ("--mock-data", "--vocab-size", "200")] + [
    "--train-iters", "3", "--tensor-model-parallel-size", "2"]
SAMPLED = ["--temperature", "1.0", "--top-k", "20", "--seed", "5"]


def _tool():
    spec = importlib.util.spec_from_file_location("generate_tool", os.path.join(REPO, "tools", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_then_generate_at_tp2(rank, world, save):
    import pretrain_moe
    from megamoe.checkpointing.format import model_config_from_dict, read_metadata
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.model.gpt import GPTModel
    from megamoe.training.checkpoint import open_checkpoint

    os.environ["WORLD_SIZE"] = str(world)
    assert pretrain_moe.main(ARGS + ["--save", save]) == 0
    tool = _tool()
    _, metadata = read_metadata(save)
    tokenizer = load_tokenizer(tool.run_tokenizer_model(metadata["args"]))
    config = model_config_from_dict(metadata["model_config"])
    layout = init_layout(2, experts_by_layer=config.experts_by_layer())
    model = GPTModel(config, layout)
    open_checkpoint(save, config, layout).load_model(model)
    common = dict(max_new_tokens=12, vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eod_id)
    greedy = tool.generate(model, tokenizer.encode(PROMPT), **common)
    sampled = tool.generate(model, tokenizer.encode(PROMPT), temperature=1.0, top_k=20,
                            generator=torch.Generator().manual_seed(5), **common)
    return [tokenizer.decode([t for t in ids if t != tokenizer.eod_id]) for ids in (greedy, sampled)]


def _generate(tmp_path, save, *extra) -> str:
    result = subprocess.run([sys.executable, "tools/generate.py", "--load", save, "--prompt", PROMPT,
                             "--max-new-tokens", "12", "--device", "cpu", *extra], cwd=REPO,
                            env=script_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_continues_a_prompt_from_a_checkpoint_of_another_layout(tmp_path):
    save = str(tmp_path / "ckpt")
    greedy_tp2, sampled_tp2 = run_distributed(_train_then_generate_at_tp2, 2, save, timeout=600)[0]
    greedy = _generate(tmp_path, save)
    sampled = _generate(tmp_path, save, *SAMPLED)
    assert greedy == PROMPT + greedy_tp2 + "\n", (greedy, greedy_tp2)
    assert sampled == PROMPT + sampled_tp2 + "\n", (sampled, sampled_tp2)
    assert sampled != greedy
    assert _generate(tmp_path, save, *SAMPLED) == sampled  # the seed decides


def test_generate_names_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "tools/generate.py", "--load", str(tmp_path / "none"), "--device", "cpu"],
                            cwd=REPO, env=script_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"generate.py: error: --load {tmp_path / 'none'}: no checkpoint there\n", result.stderr
