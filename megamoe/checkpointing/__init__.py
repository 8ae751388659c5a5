"""Checkpoint conversion: reshard a megamoe checkpoint to any layout (TP, EP per MoE layer, DP,
ZeRO-1, optimizer state included), consolidate it to one layout-free copy and back, export to and
import from Hugging Face Mixtral.  ``convert`` is the entry point; ``tools/convert_checkpoint.py``
its command line."""

from megamoe.checkpointing.convert import ConversionSummary, convert

__all__ = ["ConversionSummary", "convert"]
