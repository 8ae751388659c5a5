"""Which global layers each pipeline stage holds: one pure function, no processes.

``stage_layer_counts`` splits ``--num-layers`` over ``P`` pipeline ranks: evenly, or with
Megatron's ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers`` on the
first / last rank and the rest split evenly over the others.  With ``V`` virtual stages
(interleaved 1F1B) each rank's layers are cut into ``V`` equal model chunks, and the pipeline
runs the ``P x V`` chunks in the order ``c = v * P + p`` (chunk ``v`` of rank ``p``), as Megatron
and ``torch.distributed.pipelining``'s interleaved schedule number them.  The global layers are
dealt to the chunks in that order, so::

    P 2, V 2, 8 layers:  rank 0 holds layers 0-1 (chunk 0) and 4-5 (chunk 2)
                         rank 1 holds layers 2-3 (chunk 1) and 6-7 (chunk 3)

``stage_layer_ranges`` returns, per pipeline rank, its chunks' ranges of global layer indices;
``build_parallel_state`` keeps one rank's as ``ParallelState.model_chunks``, and the checkpoint
tools call it for any rank of any layout.  Errors are one-line ``ValueError`` naming the flags;
``validate_parallel_layout`` runs them before any group is formed.
"""

from __future__ import annotations

from megamoe.int_list import divisors


def stage_layer_counts(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers of each of the ``pp`` pipeline ranks, first to last (they sum to ``num_layers``)."""
    if pp < 1:
        raise ValueError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    for name, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if value is None:
            continue
        if pp == 1:
            raise ValueError(f"{name} {value} needs --pipeline-model-parallel-size > 1 (got 1)")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if first is None and last is None:
        if num_layers % pp != 0:
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}; valid sizes: "
                f"{divisors(num_layers)}, or give --decoder-first-pipeline-num-layers / "
                f"--decoder-last-pipeline-num-layers for uneven stages"
            )
        return [num_layers // pp] * pp
    fixed = (first or 0) + (last or 0)
    others = pp - (first is not None) - (last is not None)
    rest = num_layers - fixed
    given = " and ".join(f"{n} {v}" for n, v in (("--decoder-first-pipeline-num-layers", first),
                                                  ("--decoder-last-pipeline-num-layers", last)) if v is not None)
    if rest < others or (others == 0 and rest != 0) or (others and rest % others != 0):
        raise ValueError(
            f"--num-layers {num_layers} with {given} leaves {rest} layers for the other {others} of "
            f"--pipeline-model-parallel-size {pp} stages: they must split evenly, at least 1 each"
        )
    middle = rest // others if others else 0
    counts = [middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def virtual_stage_count(counts: list[int], virtual_size: int | None, layers_per_virtual_stage: int | None) -> int:
    """V, the model chunks per pipeline rank, from ``--virtual-pipeline-model-parallel-size`` or
    ``--num-layers-per-virtual-pipeline-stage`` (neither: 1); every rank's layers (``counts``) must
    cut into V equal chunks."""
    pp = len(counts)
    if virtual_size is not None and layers_per_virtual_stage is not None:
        raise ValueError("give --virtual-pipeline-model-parallel-size or --num-layers-per-virtual-pipeline-stage, "
                         "not both")
    if layers_per_virtual_stage is not None:
        n = layers_per_virtual_stage

        def equal_chunks(size: int) -> bool:
            return not any(c % size for c in counts) and len({c // size for c in counts}) == 1

        if n < 1 or not equal_chunks(n):
            raise ValueError(
                f"--num-layers-per-virtual-pipeline-stage {n} must divide every pipeline stage's layers {counts} "
                f"into the same number of chunks; valid values: {[d for d in divisors(min(counts)) if equal_chunks(d)]}"
            )
        virtual = counts[0] // n
    else:
        virtual = 1 if virtual_size is None else virtual_size
    if virtual < 1:
        raise ValueError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {virtual}")
    if virtual > 1 and pp == 1:
        raise ValueError("the interleaved schedule (virtual pipeline stages) needs --pipeline-model-parallel-size > 1")
    if any(c % virtual for c in counts):
        valid = [v for v in divisors(min(counts)) if not any(c % v for c in counts)]
        raise ValueError(
            f"--virtual-pipeline-model-parallel-size {virtual} does not divide every pipeline stage's layers "
            f"{counts}; valid values: {valid}"
        )
    return virtual


def stage_layer_ranges(num_layers: int, pp: int, virtual: int = 1, first: int | None = None,
                       last: int | None = None) -> list[tuple[range, ...]]:
    """Per pipeline rank ``p`` (list index), its ``virtual`` model chunks' global layer ranges;
    chunk ``v`` of rank ``p`` is pipeline chunk ``v * pp + p``.  Raises ``ValueError`` (see
    ``stage_layer_counts`` and ``virtual_stage_count``) when the layers cannot be split so."""
    counts = stage_layer_counts(num_layers, pp, first, last)
    virtual_stage_count(counts, virtual, None)
    ranges: list[list[range]] = [[] for _ in range(pp)]
    start = 0
    for v in range(virtual):
        for p in range(pp):
            size = counts[p] // virtual
            ranges[p].append(range(start, start + size))
            start += size
    return [tuple(r) for r in ranges]
