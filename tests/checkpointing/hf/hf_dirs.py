"""A Hugging Face model directory with only its ``config.json`` (and an empty weights file), for
the tests of what an import refuses before it reads any weight."""

import json


def config_only_dir(tmp_path, config: dict) -> str:
    root = tmp_path / config["model_type"]
    root.mkdir()
    json.dump(config, open(root / "config.json", "w"))
    (root / "model.safetensors").write_bytes(b"")
    return str(root)
