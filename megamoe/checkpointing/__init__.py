"""megamoe checkpoints.

The engine (this package): the on-disk format (``format``: paths, ``metadata.json``, the shard
files, the ``SavedTopology`` a checkpoint records), each parameter's layout-free form
(``param_specs``), the boxes of global tensors a rank holds (``boxes``, ``box_views``), saving
each box once from any layout (``save``), loading into any layout (``load``), and which saved
RNG states a rank of another layout continues from (``rng_map``).

``convert``: offline conversion through the full (layout-free) state: consolidated copies, the
version 1 reader, resharding to another layout, the proof that nothing was lost; its entry point
is ``convert.run.convert``, its command line ``tools/convert_checkpoint.py``.

``hf``: Hugging Face Mixtral / Qwen3-MoE ``config.json``, tensor names, export and import.
"""
