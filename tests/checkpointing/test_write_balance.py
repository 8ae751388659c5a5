"""Each box of a checkpoint is written by one of its holders, chosen so that the shard files come
out even: boxes only one rank holds (ZeRO-1 shards) are that rank's, and the replicated ones fill
the other ranks first."""

from megamoe.checkpointing.save import _assign


def _box(key: str, nbytes: int) -> tuple:
    return (key, (0,), (nbytes,), nbytes, (nbytes,), "float32")


def test_replicated_boxes_even_out_what_single_holders_must_write():
    # Rank 0 alone holds an optimizer shard; both hold two replicated weights, one larger than it.
    plans = [[_box("w1", 100), _box("shard0", 60), _box("w2", 40)], [_box("w1", 100), _box("w2", 40)]]
    writer = _assign(plans)
    load = [0, 0]
    for (key, _, sizes), rank in writer.items():
        load[rank] += sizes[0]
    assert writer[("shard0", (0,), (60,))] == 0
    assert load == [100, 100], writer
