"""Hugging Face directories for the import and export tests: one with only its ``config.json``
(what an import refuses before it reads any weight), and the round trip HF -> megamoe -> HF."""

import json
import os

from safetensors.torch import load_file

from megamoe.checkpointing.convert.run import convert


def config_only_dir(tmp_path, config: dict) -> str:
    root = tmp_path / config["model_type"]
    root.mkdir()
    json.dump(config, open(root / "config.json", "w"))
    (root / "model.safetensors").write_bytes(b"")
    return str(root)


def round_trip(root: str, tmp_path) -> tuple[list[str], dict, dict]:
    """Import the HF model at ``root`` for world 2 at TP 2, export it back; returns the paths
    (imported, exported, and a third for the test's own re-import), the exported tensors and the
    original ones."""
    paths = [str(tmp_path / n) for n in ("imported", "exported", "again")]
    convert(root, paths[0], from_format="hf", target_world_size=2, target_tensor_parallel_size=2, progress=None)
    convert(paths[0], paths[1], to="hf", progress=None)
    want = load_file(os.path.join(root, "model.safetensors"))
    got = {}
    for name in sorted(os.listdir(paths[1])):
        if name.endswith(".safetensors"):
            got.update(load_file(os.path.join(paths[1], name)))
    return paths, got, want
