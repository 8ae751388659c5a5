"""megamoe checkpoints: the on-disk format (``format``), saving each tensor once from any layout
(``sharded_save``) and loading into any layout (``sharded_load``), and the conversion tools:
consolidate to one layout-free copy and back, export to and import from Hugging Face Mixtral,
turn version 1 checkpoints into version 2.  ``convert`` is the conversion's entry point;
``tools/convert_checkpoint.py`` its command line."""

from megamoe.checkpointing.convert import ConversionSummary, convert

__all__ = ["ConversionSummary", "convert"]
