"""Hugging Face export and import: the safetensors files, ``config.json`` and the tokenizer.

Export writes one ``model-XXXXX-of-NNNNN.safetensors`` per group plus
``model.safetensors.index.json``, ``config.json`` (``config``: Mixtral or Qwen3-MoE) and,
with a sentencepiece model, the tokenizer files; tensor names come from ``names``.  Import
accepts that layout or a single ``model.safetensors``; every HF tensor must map onto a megamoe
parameter, or the import stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.checkpointing.convert.accounting import Tally
from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo, stream_groups
from megamoe.checkpointing.format import CheckpointError, model_config_dict, model_config_from_dict, write_atomic
from megamoe.checkpointing.hf.config import check_exportable, from_hf_config, to_hf_config
from megamoe.checkpointing.hf.names import hf_names, join, split
from megamoe.checkpointing.param_specs import buffer_names, model_specs

INDEX = "model.safetensors.index.json"
_FP32_ROUTER = (".mlp.gate.e_score_correction_bias", ".mlp.gate.weight")
SINGLE = "model.safetensors"


def _tokenizer_files(root: str, tokenizer_model: str, max_length: int) -> dict[str, int]:
    """Copy the sentencepiece model and describe it for ``AutoTokenizer``; return the special ids."""
    import sentencepiece as spm

    if not os.path.isfile(tokenizer_model):
        raise ValueError(f"--tokenizer-model {tokenizer_model} is not a file")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    shutil.copyfile(tokenizer_model, os.path.join(root, "tokenizer.model"))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    pieces = {key.replace("_id", ""): sp.id_to_piece(i) for key, i in ids.items() if i >= 0}
    pieces["unk_token"] = sp.id_to_piece(sp.unk_id())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        # megamoe's data pipeline ends documents with EOS and never prepends BOS.
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        **pieces,
    }
    write_atomic(os.path.join(root, "tokenizer_config.json"), json.dumps(config, indent=1))
    write_atomic(os.path.join(root, "special_tokens_map.json"), json.dumps(pieces, indent=1))
    return {key: i for key, i in ids.items() if i >= 0}


class HFWriter:
    """Exports ``info``'s weights to ``root`` as a Hugging Face model (``config.export_family``)."""

    def __init__(self, root: str, info: FullStateInfo, *, tokenizer_model: str | None) -> None:
        self.root, self.info = root, info
        self.config = model_config_from_dict(info.model_config)
        check_exportable(self.config)
        os.makedirs(root)
        self.num_files = len(stream_groups(list(info.specs)))
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.tokenizer_model = tokenizer_model
        self.buffers = dict(info.buffers)  # written with the first group (DeepSeek-V3's expert biases)

    def write(self, full: dict[str, dict[str, torch.Tensor]]) -> None:
        filename = f"model-{len(set(self.weight_map.values())) + 1:05d}-of-{self.num_files:05d}.safetensors"
        tensors = {}
        for name, tensor in self.buffers.items():
            tensors.update(split(name, tensor, self.config))
        self.buffers = {}
        for name, state in full.items():
            tensors.update(split(name, state[PARAM], self.config))
        save_file(tensors, os.path.join(self.root, filename), metadata={"format": "pt"})
        for hf_name, tensor in tensors.items():
            self.weight_map[hf_name] = filename
            self.total_bytes += tensor.numel() * tensor.element_size()

    def finish(self, progress=None) -> None:
        special = None
        if self.tokenizer_model is not None:
            special = _tokenizer_files(self.root, self.tokenizer_model, self.config.max_position_embeddings)
        elif progress is not None:
            progress("no --tokenizer-model given: the export has no tokenizer files")
        dtype = self.info.specs["word_embeddings.weight"].dtype
        hf = to_hf_config(self.config, dtype=dtype, special_ids=special)
        write_atomic(os.path.join(self.root, "config.json"), json.dumps(hf, indent=1))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        write_atomic(os.path.join(self.root, INDEX), json.dumps(index, indent=1))


def _open(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the Hugging Face checkpoint is incomplete")
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} cannot be read as safetensors ({type(err).__name__}: {err})") from None


class HFReader:
    """A ``FullStateReader`` over a Hugging Face Mixtral, Qwen3-MoE or DeepSeek-V3 directory
    (weights, and DeepSeek-V3's expert biases as buffers).  DeepSeek-V3's MTP depths are imported
    when the files hold their weights (``model.layers.{num_hidden_layers}.*``)."""

    def __init__(self, root: str, progress=None) -> None:
        self.root = root
        config_path = os.path.join(root, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path} is missing: {root} is not a Hugging Face model directory")
        hf = json.load(open(config_path))
        try:  # the configuration first: refusing a model should not need its weights
            config = from_hf_config(hf)
        except ValueError as err:
            raise CheckpointError(f"{config_path}: {err}") from None
        except KeyError as err:
            raise CheckpointError(f"{config_path}: no field {err} (model_type {hf.get('model_type')!r} needs it)") from None
        index_path = os.path.join(root, INDEX)
        if os.path.isfile(index_path):
            weight_map = json.load(open(index_path))["weight_map"]
        else:
            handle = _open(os.path.join(root, SINGLE))
            weight_map = {key: SINGLE for key in handle.keys()}
        self.handles = {file: _open(os.path.join(root, file)) for file in sorted(set(weight_map.values()))}
        self.tally = Tally()
        self.file_of: dict[str, str] = {}
        for file, handle in self.handles.items():
            self.tally.expect(os.path.join(root, file), set(handle.keys()))
            self.file_of.update({key: file for key in handle.keys()})
        missing_in_files = sorted(set(weight_map) - set(self.file_of))
        if missing_in_files:
            raise CheckpointError(f"{index_path} lists tensors no file holds: {missing_in_files[:5]}")
        # DeepSeek-V3 keeps its router in fp32 whatever the weights' dtype: the router weight is
        # read in the model's dtype, the expert bias (a buffer) stays fp32 as megamoe's.
        dtypes = {self.handles[file].get_slice(key).get_dtype() for key, file in self.file_of.items()
                  if not key.endswith(_FP32_ROUTER)}
        if len(dtypes) != 1:
            raise CheckpointError(f"{root}: the weights mix dtypes {sorted(dtypes)}; megamoe models have one dtype")
        params_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtypes.pop())
        if params_dtype is None:
            raise CheckpointError(f"{root}: weight dtype is not fp32, bf16 or fp16")
        self.family = hf["model_type"]
        self.rope_interleaved = bool(hf.get("rope_interleave", True))
        mtp = hf.get("num_nextn_predict_layers") or 0
        if self.family == "deepseek_v3" and mtp and f"model.layers.{config.num_layers}.eh_proj.weight" in self.file_of:
            config = dataclasses.replace(config, mtp_num_layers=mtp)
        elif self.family == "deepseek_v3" and mtp and progress is not None:
            progress(f"config.json has num_nextn_predict_layers {mtp} but the files hold no MTP weights "
                     f"(model.layers.{config.num_layers}.*): imported without multi-token prediction")
        self.config = config
        self.info = FullStateInfo(
            model_config=model_config_dict(config),
            specs=model_specs(config, params_dtype),
            iteration=0,
            consumed_samples=0,
            args={},
            optimizer=None,
            rng=None,
            source_topology=None,
        )
        buffers = buffer_names(config)  # each call builds the model on the meta device
        for name in [*self.info.specs, *buffers]:
            absent = [n for n in hf_names(name, config) if n not in self.file_of]
            if absent:
                raise CheckpointError(f"{root}: no tensor {absent[0]} for megamoe parameter {name}")
        self.info.buffers = {name: self._join(name) for name in buffers}

    def _join(self, name: str) -> torch.Tensor:
        parts = []
        for hf_name in hf_names(name, self.config):
            file = self.file_of[hf_name]
            parts.append(self.handles[file].get_tensor(hf_name))
            self.tally.use(os.path.join(self.root, file), hf_name)
        try:
            return join(name, parts, self.config, rope_interleaved=self.rope_interleaved)
        except ValueError as err:
            raise CheckpointError(f"{self.root}: {err}") from None

    def read(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name in names:
            spec = self.info.specs[name]
            full = self._join(name)
            if name.endswith("mlp.router.weight") and full.is_floating_point():
                full = full.to(spec.dtype)  # DeepSeek-V3's fp32 router in a bf16 checkpoint
            if tuple(full.shape) != spec.shape or full.dtype != spec.dtype:
                raise CheckpointError(
                    f"{self.root}: {name} assembles to {full.dtype} {tuple(full.shape)} from "
                    f"{hf_names(name, self.config)[0]}..., the model needs {spec.dtype} {spec.shape}"
                )
            out[name] = {PARAM: full}
        return out

    def close(self) -> None:
        self.handles = {}
