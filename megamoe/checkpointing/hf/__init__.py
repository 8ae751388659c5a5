"""Hugging Face interchange: ``config`` (megamoe ``ModelConfig`` <-> ``config.json``), ``names``
(parameter names <-> tensor names), ``checkpoint`` (the export writer and import reader the
converter streams through)."""
