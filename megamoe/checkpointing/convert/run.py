"""One conversion, start to finish: open the source, stream it group by group into the target
format in a temporary directory, check that nothing was lost, then move the result into place.

    summary = convert("ckpt/run1", "ckpt/run1_tp2", to="megamoe", target_tensor_parallel_size=2)

Sources: a sharded megamoe checkpoint (the save root, or one ``iter_XXXXXXX`` directory), a
consolidated one (detected by its ``metadata.json``), or a Hugging Face Mixtral / Qwen3-MoE export
(``from_format="hf"``).  Targets (``to``): ``megamoe`` (sharded, any layout), ``consolidated``,
``hf``.  The target layout defaults to the source's (consolidated: the layout it was
consolidated from; Hugging Face: world 1, PP 1, TP 1, EP 1, no ZeRO-1).  Any source layout,
pipeline-parallel ones included, converts: the full state does not depend on it.  A Hugging Face import has no
optimizer or RNG state: train from it with ``--load DIR --finetune``.

Verification: every tensor of every source file must have been read (``Tally``); the full
tensors are checksummed on the way in, and the finished target is read back by its own reader
and must give the same count and checksum before it replaces anything.  The target is written
to ``SAVE_DIR.tmp-PID`` and renamed into place; an existing non-empty ``SAVE_DIR`` is refused
unless ``force``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field

from megamoe.checkpointing.convert import consolidated
from megamoe.checkpointing.convert.accounting import FullChecksum
from megamoe.checkpointing.convert.full_state import PARAM, FullStateInfo, stream_groups
from megamoe.checkpointing.convert.legacy_reader import LegacyReader
from megamoe.checkpointing.convert.sharded_reader import ShardedReader
from megamoe.checkpointing.convert.sharded_writer import ShardedWriter
from megamoe.checkpointing.convert.target import target_topology
from megamoe.checkpointing.format import (
    LEGACY_VERSION,
    MARKER,
    SavedTopology,
    CheckpointError,
    model_config_from_dict,
    read_metadata,
)
from megamoe.checkpointing.hf import checkpoint as hf_checkpoint
from megamoe.checkpointing.hf.config import check_exportable, export_family

TARGETS = ("megamoe", "consolidated", "hf")


@dataclass
class ConversionSummary:
    source: str  # what was read, with its layout
    target: str
    files_read: int
    tensors_read: int  # every tensor in the source files
    tensors_used: int  # canonical shards, ZeRO-1 ranges and unsharded tensors
    replicas_compared: int  # copies compared bitwise with the canonical one
    source_full: FullChecksum  # every full tensor read from the source
    target_full: FullChecksum  # the same, read back from the finished target
    not_exported: list[str] = field(default_factory=list)  # what the target format cannot hold, said aloud
    model_flags: list[str] = field(default_factory=list)  # a megamoe target: the flags that train its model

    def lines(self) -> list[str]:
        out = [
            f"source: {self.source}",
            f"  read {self.files_read} files, {self.tensors_read} tensors: {self.tensors_used} used, "
            f"{self.replicas_compared} replicas compared bitwise with their canonical copy",
            f"  full state converted: {self.source_full}",
            f"target: {self.target}",
            f"  read back: {self.target_full}",
        ]
        out += [f"  not exported: {item}" for item in self.not_exported]
        if self.model_flags:
            out.append("  train it with --load and --use-checkpoint-args, or with these model flags (--vocab-size "
                       "with --mock-data; real data takes it from --tokenizer-model): " + " ".join(self.model_flags))
        return out


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_source(load_dir: str, from_format: str | None, progress=None):
    """A ``FullStateReader`` for ``load_dir`` and a one-line description of it; ``progress``
    receives what a Hugging Face import leaves out."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load-dir {load_dir} is not a directory")
    if from_format == "hf":
        reader = hf_checkpoint.HFReader(load_dir, progress)
        return reader, f"{load_dir} (Hugging Face {reader.family})"
    if from_format is not None:
        raise ValueError(f"--from {from_format!r}: valid values are ['hf'] (megamoe formats are detected)")
    if consolidated.is_consolidated(load_dir):
        return consolidated.ConsolidatedReader(load_dir), f"{load_dir} (consolidated)"
    found = read_metadata(load_dir, legacy=True)
    if found is None:
        hint = (
            " (it looks like a Hugging Face model: pass --from hf)"
            if os.path.isfile(os.path.join(load_dir, "config.json"))
            else ""
        )
        raise CheckpointError(
            f"{load_dir} is not a megamoe checkpoint: it has neither {MARKER} nor metadata.json{hint}"
        )
    directory, metadata = found
    if metadata["version"] == LEGACY_VERSION:
        reader = LegacyReader(directory, metadata)
        return reader, f"{directory} (version 1, {reader.topology.describe()})"
    reader = ShardedReader(directory, metadata)
    return reader, f"{directory} ({reader.topology.describe()})"


def _check_save_dir(load_dir: str, save_dir: str, force: bool) -> None:
    src, dst = os.path.realpath(load_dir), os.path.realpath(save_dir)
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ValueError(f"--save-dir {save_dir} overlaps --load-dir {load_dir}; write the conversion elsewhere")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"--save-dir {save_dir} exists and is not a directory")
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not force:
        raise ValueError(f"--save-dir {save_dir} exists and is not empty; pass --force to replace it")


def _install(tmp: str, save_dir: str) -> None:
    """Replace ``save_dir`` by ``tmp`` with renames only (the old one is removed last)."""
    old = None
    if os.path.isdir(save_dir) and os.listdir(save_dir):
        old = f"{save_dir}.old-{os.getpid()}"
        os.rename(save_dir, old)
    elif os.path.isdir(save_dir):
        os.rmdir(save_dir)
    os.rename(tmp, save_dir)
    if old is not None:
        shutil.rmtree(old)


def _target(info: FullStateInfo, to: str, tmp: str, layout_flags: dict, tokenizer_model: str | None):
    """The writer for ``to`` and a description of the target."""
    if to == "consolidated":
        return consolidated.ConsolidatedWriter(tmp, info), "consolidated (layout-free)"
    if to == "hf":
        writer = hf_checkpoint.HFWriter(tmp, info, tokenizer_model=tokenizer_model)
        return writer, f"Hugging Face {export_family(writer.config)}"
    source = info.source_topology
    config = model_config_from_dict(info.model_config)
    world = layout_flags["world_size"] or (source.world_size if source else 1)
    tp = layout_flags["tensor_model_parallel_size"] or (source.tp if source else 1)
    eps = layout_flags["expert_model_parallel_size"] or (source.expert_model_parallel_size if source else (1,))
    pp = layout_flags["pipeline_model_parallel_size"] or (source.pp if source else 1)
    etp = layout_flags["expert_tensor_parallel_size"]
    if etp is None and source is not None and layout_flags["tensor_model_parallel_size"] is None:
        etp = source.etp  # the source's layout unless TP changes; a new TP alone means ETP = TP
    zero = layout_flags["use_distributed_optimizer"]
    if zero is None:
        zero = source.use_distributed_optimizer if source else False
    topology = target_topology(
        config,
        world_size=world,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=eps,
        use_distributed_optimizer=zero,
        expert_tensor_parallel_size=etp,
        pipeline_model_parallel_size=pp,
    )
    return ShardedWriter(tmp, info, topology), f"megamoe ({topology.describe()})"


def _stream(reader, writer, progress) -> tuple[FullChecksum, FullChecksum]:
    """Copy every group from ``reader`` to ``writer`` (None: only read).  Returns the checksums of
    all full tensors and of the model weights alone."""
    everything, weights = FullChecksum(), FullChecksum()
    groups = stream_groups(list(reader.info.specs))
    for index, (key, names) in enumerate(groups):
        full = reader.read(names)
        for name, state in full.items():
            reader.info.check(name, state)
            for kind, tensor in state.items():
                everything.add(f"{kind}/{name}", tensor)
            weights.add(f"{PARAM}/{name}", state[PARAM])
        if writer is not None:
            writer.write(full)
        if progress is not None:
            size = sum(t.numel() * t.element_size() for state in full.values() for t in state.values())
            progress(f"[{index + 1}/{len(groups)}] {key}: {len(names)} parameters, {size / 2**20:.1f} MiB")
    reader.tally.check_complete()
    return everything, weights


def convert(
    load_dir: str,
    save_dir: str,
    *,
    to: str = "megamoe",
    from_format: str | None = None,
    target_world_size: int | None = None,
    target_tensor_parallel_size: int | None = None,
    target_expert_parallel_size: tuple[int, ...] | None = None,
    target_use_distributed_optimizer: bool | None = None,
    target_expert_tensor_parallel_size: int | None = None,
    target_pipeline_model_parallel_size: int | None = None,
    tokenizer_model: str | None = None,
    force: bool = False,
    progress=_stderr,
) -> ConversionSummary:
    """Convert ``load_dir`` into ``save_dir`` (see the module docstring); ``progress`` receives
    one line per step (None: silent).  Raises ``CheckpointError`` for a broken source and
    ``ValueError`` for an impossible request, naming the flag or the file."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: valid values are {list(TARGETS)}")
    if to != "megamoe" and any(
        v is not None
        for v in (
            target_world_size,
            target_tensor_parallel_size,
            target_expert_parallel_size,
            target_use_distributed_optimizer,
            target_expert_tensor_parallel_size,
            target_pipeline_model_parallel_size,
        )
    ):
        raise ValueError(f"--to {to} is layout-free: the --target-* layout flags only apply to --to megamoe")
    if tokenizer_model is not None and to != "hf":
        raise ValueError("--tokenizer-model only applies to --to hf")
    _check_save_dir(load_dir, save_dir, force)
    reader, source_text = open_source(load_dir, from_format, progress)
    if to == "hf":
        check_exportable(model_config_from_dict(reader.info.model_config))
    tmp = f"{os.path.abspath(save_dir)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        layout_flags = {
            "world_size": target_world_size,
            "tensor_model_parallel_size": target_tensor_parallel_size,
            "expert_model_parallel_size": target_expert_parallel_size,
            "use_distributed_optimizer": target_use_distributed_optimizer,
            "expert_tensor_parallel_size": target_expert_tensor_parallel_size,
            "pipeline_model_parallel_size": target_pipeline_model_parallel_size,
        }
        writer, target_text = _target(reader.info, to, tmp, layout_flags, tokenizer_model)
        source_full, source_weights = _stream(reader, writer, progress)
        writer.finish(progress)
        tally = reader.tally
        reader.close()
        if progress is not None:
            progress(f"verifying {tmp}")
        check_reader, _ = open_source(tmp, "hf" if to == "hf" else None)
        target_full, _ = _stream(check_reader, None, None)
        check_reader.close()
        expected, not_exported = source_full, []
        if to == "hf":
            # Hugging Face holds the weights only; say what stays behind instead of dropping it quietly.
            expected = source_weights
            if source_full.count > source_weights.count:
                not_exported.append(
                    f"the optimizer state ({source_full.count - source_weights.count} full tensors: fp32 master "
                    "and Adam moments); Hugging Face checkpoints hold weights only"
                )
            if reader.info.rng is not None:
                not_exported.append(
                    f"the training position (iteration {reader.info.iteration}, {reader.info.consumed_samples} "
                    "consumed samples), RNG states and run flags"
                )
        if (target_full.count, target_full.digest) != (expected.count, expected.digest):
            raise CheckpointError(
                f"{tmp}: the written checkpoint reads back as {target_full}, but the source gave {expected}; "
                "nothing was installed"
            )
        _install(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionSummary(
        source=source_text,
        target=f"{save_dir} ({target_text})",
        files_read=tally.num_files,
        tensors_read=tally.num_tensors,
        tensors_used=tally.used,
        replicas_compared=tally.replicas,
        source_full=source_full,
        target_full=target_full,
        not_exported=not_exported,
        model_flags=_model_flags(save_dir) if to == "megamoe" else [],
    )


_PRECISION_FLAGS = {"bfloat16": ["--bf16"], "float16": ["--fp16"]}


def _model_flags(save_dir: str) -> list[str]:
    """The training flags of the model of the megamoe checkpoint just written to ``save_dir``:
    its architecture, its weights' precision and the EP sizes of the layout it was written for."""
    metadata = read_metadata(save_dir)[1]
    config = model_config_from_dict(metadata["model_config"])
    eps = SavedTopology.from_metadata(metadata["layout"]).expert_model_parallel_size
    dtype = next(entry["dtype"] for key, entry in metadata["tensors"].items() if key.startswith("model/"))
    ep_flags = ["--expert-model-parallel-size", ",".join(map(str, eps))] if set(eps) - {1} else []
    return config.training_flags() + _PRECISION_FLAGS.get(dtype, []) + ep_flags + ["--vocab-size", str(config.vocab_size)]
