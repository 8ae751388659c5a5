"""Offline checkpoint conversion, through the full (layout-free) state (``full_state``).

Readers: a version 2 checkpoint (``sharded_reader``), version 1 (``legacy_reader``), a
consolidated copy (``consolidated``), Hugging Face (``megamoe.checkpointing.hf``).  Writers:
version 2 for a target topology (``sharded_writer``, ``target``), consolidated, Hugging Face.
``accounting`` proves that nothing was lost; ``run.convert`` is the entry point.
"""
