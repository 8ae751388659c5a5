"""Which ranks form each group: the pure formulas of the rank layout, over the ranks of a world
or of one pipeline stage (``megamoe.parallel.state`` forms the process groups from these lists).

Rank layout (documented contract; the tests check it).  PP is outermost: the world is P pipeline
stages of S = world / P consecutive ranks, and every other group is formed inside one stage by
the formulas below applied to the rank within the stage::

    pipeline       global_rank = pp_rank * S + stage_rank                       (PP slowest)
    dense layers   stage_rank  = dp_rank * TP + tp_rank                 (TP fastest, then DP)
    experts        stage_rank  = (edp_rank * EP + ep_rank) * ETP + etp_rank   (for each EP size)

    PP group      : the P ranks with one stage_rank {p * S + stage_rank  for p in range(P)}
    stage group   : the S ranks of one stage (what "the world" is for the groups below)
    embedding group: the first and the last stage's rank with one stage_rank (the tied input
                    embedding and output layer); its DP version, the first and last stage's DP
                    groups of one tp_rank, reduces the tied weight's gradient (only the DP
                    version is created as a process group: no collective runs over the other)

    (within one stage, ranks counted from the stage's first)
    TP group      : the TP consecutive ranks   {dp_rank * TP + t  for t in range(TP)}
    DP group      : the ranks with one tp_rank {d * TP + tp_rank  for d in range(DP)}
    ETP group     : the ETP consecutive ranks  {r - etp_rank + e  for e in range(ETP)}
    EP group(ep)  : ep ranks of one block of ep * ETP consecutive ranks, with the same etp_rank
    EDP group(ep) : the S / (ep * ETP) ranks with the same (ep_rank, etp_rank): the same
                    expert shards

Each stage holds consecutive layers (``megamoe.parallel.pipeline.stages``: the pure function that
splits them, also into the interleaved schedule's virtual chunks); a MoE layer keeps its global
index and its EP size, and every stage forms the groups of every EP size of the model.

The experts' layout is folded over the world independently of the dense one ("MoE parallel
folding"): ETP (``--expert-tensor-parallel-size``, default TP) shards every expert, and EP x ETP
may span TP and DP.  With ETP = TP the expert groups are the classic ones: every EP group is made
of ranks with one TP rank (EP consecutive ranks of a DP group) and experts are tensor-parallel
over the TP group.  With ETP = 1 and EP = TP x DP every rank holds whole experts of its own.
"""


def consecutive_rank_lists(world_size: int, size: int) -> list[list[int]]:
    """Blocks of ``size`` consecutive ranks: the TP groups (size TP) and the ETP groups (size ETP)."""
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def dp_rank_lists(world_size: int, tp: int) -> list[list[int]]:
    return [list(range(t, world_size, tp)) for t in range(tp)]


def ep_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [
        [start + e * etp + t for e in range(ep)] for start in range(0, world_size, block) for t in range(etp)
    ]


def edp_rank_lists(world_size: int, etp: int, ep: int) -> list[list[int]]:
    block = ep * etp
    return [list(range(offset, world_size, block)) for offset in range(block)]


def in_every_stage(rank_lists: list[list[int]], stage_size: int, pp: int) -> list[list[int]]:
    """``rank_lists`` of one stage's ranks (0 .. stage_size - 1), repeated for each of the ``pp``
    stages with its global ranks (stage p's rank r is ``p * stage_size + r``)."""
    return [[p * stage_size + r for r in ranks] for p in range(pp) for ranks in rank_lists]


def pp_rank_lists(world_size: int, pp: int) -> list[list[int]]:
    stage = world_size // pp
    return [[p * stage + r for p in range(pp)] for r in range(stage)]


def embedding_rank_lists(world_size: int, pp: int) -> list[list[int]]:
    """The first and last stage's rank of each stage_rank."""
    stage = world_size // pp
    return [[r, (pp - 1) * stage + r] for r in range(stage)]


def embedding_dp_rank_lists(world_size: int, pp: int, tp: int) -> list[list[int]]:
    """For each tp_rank, the first stage's DP group followed by the last stage's."""
    stage = world_size // pp
    return [dp + [(pp - 1) * stage + r for r in dp] for dp in dp_rank_lists(stage, tp)]
