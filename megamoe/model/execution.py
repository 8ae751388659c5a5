"""ExecutionConfig: how the model runs, as opposed to what it computes (``ModelConfig``).

Precision, activation recomputation, the chunked output layer, the expert GEMM path and the fused
kernels change
memory and speed, never the function: a checkpoint does not record them, and any of them may
change on resume.  Each field declares its flag (``megamoe.flags``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.flags import check_fields, derived, flag, non_negative

# The chunk of --cross-entropy-chunk-size when it is not given, on CUDA: a moe-1b-4e step never holds
# the 2.1 GB of fp32 logits (and their softmax, kept for backward) for about 1% more memory traffic
# (bench/bench_step_traffic.py); elsewhere (CPU) the plain path stays the default.
CUDA_CROSS_ENTROPY_CHUNK = 4096


@dataclass
class ExecutionConfig:
    params_dtype: torch.dtype = derived(torch.float32, help="--bf16 / --fp16")
    cross_entropy_chunk_size: int | None = flag(
        None, help="output layer and cross entropy this many tokens at a time, their gradients computed in "
                   "forward: the logits of the whole micro-batch never exist (0: all at once)", check=non_negative,
        default_text=f"{CUDA_CROSS_ENTROPY_CHUNK} on CUDA, 0 elsewhere")
    recompute_granularity: str | None = flag(
        None, choices=("full", "selective"),
        help="full: recompute layers in backward (see --recompute-method); selective: Megatron's core-attention "
             "recompute, which SDPA already is: it keeps no attention-score matrix, so nothing more is recomputed")
    recompute_method: str | None = flag(
        None, choices=("uniform", "block"),
        help="with --recompute-granularity full: uniform: every layer, in chunks of --recompute-num-layers layers "
             "that keep only their input; block: only the first --recompute-num-layers layers, each on its own",
        default_text="block with --recompute-num-layers, else uniform")
    recompute_num_layers: int | None = flag(None, help="with --recompute-granularity full: layers per chunk "
                                                       "(uniform) or recomputed layers (block)",
                                            default_text="1 (uniform), all (block)")
    moe_grouped_gemm: bool = flag(True, name="--no-moe-grouped-gemm", help="one matmul per expert instead of "
                                                                           "torch._grouped_mm")
    fused_kernels: bool = flag(
        True, name="--no-fused-kernels",
        help="plain PyTorch ops instead of megamoe's fused Triton kernels (SwiGLU, RoPE, cross entropy, MoE "
             "combine), which run only on CUDA with the gpu extra installed, each once it passed its start-up "
             "check against the plain ops on the device (megamoe.kernels.use_fused, megamoe.kernels.guard)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            raise ValueError("--recompute-method and --recompute-num-layers need --recompute-granularity full")

    def cross_entropy_chunk_for(self, device: torch.device) -> int:
        """Tokens per chunk of the output layer + cross entropy on ``device`` (0: not chunked):
        --cross-entropy-chunk-size, or when it is not given ``CUDA_CROSS_ENTROPY_CHUNK`` on CUDA
        and 0 elsewhere."""
        if self.cross_entropy_chunk_size is not None:
            return self.cross_entropy_chunk_size
        return CUDA_CROSS_ENTROPY_CHUNK if device.type == "cuda" else 0

    def layer_chunks(self, num_layers: int, what: str = "--num-layers") -> list[tuple[int, int, bool]]:
        """``(first, end, recompute)`` spans of a model's ``num_layers`` layers in order, covering
        every layer: what ``--recompute-granularity full`` recomputes, and as which units (a
        recomputed span keeps only its input for backward).  At PP > 1 they are a model chunk's
        layers (``what`` names them in the error).  Raises ``ValueError`` when
        ``--recompute-num-layers`` does not fit the model."""
        if self.recompute_num_layers is not None and not 1 <= self.recompute_num_layers <= num_layers:
            raise ValueError(
                f"--recompute-num-layers {self.recompute_num_layers} must be in [1, {what} {num_layers}]"
            )
        if self.recompute_granularity != "full":
            return [(i, i + 1, False) for i in range(num_layers)]
        method = self.recompute_method or ("block" if self.recompute_num_layers else "uniform")
        if method == "block":
            n = self.recompute_num_layers or num_layers
            return [(i, i + 1, i < n) for i in range(num_layers)]
        n = self.recompute_num_layers or 1
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
