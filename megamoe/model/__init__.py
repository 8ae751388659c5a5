"""The GPT / MoE GPT model: config, attention, MLP, MoE, the decoder."""
