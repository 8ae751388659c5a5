"""megamoe: Megatron-style pretraining of Mixture-of-Experts language models.

Dependency direction: parallel <- model, optim <- training <- pretrain_moe.py; data stands alone.
"""

__version__ = "0.1.0"
