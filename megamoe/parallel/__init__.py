"""Process groups, tensor-parallel layers and collectives.  Knows nothing of models."""
