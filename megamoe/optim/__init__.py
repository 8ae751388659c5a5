"""Mixed-precision, EP-aware ZeRO-1 optimizer.

``grad_buffer`` (main-grad buffers, buckets, shards, the gradient-reduction rule), ``grad_norm``
(the global norm), ``loss_scaler``, ``adam`` (which Adam runs), ``optimizer`` (the step),
``state_dict`` (checkpointable state).  Depends on ``megamoe.parallel`` only: it sees parameters
and their ``ParamMeta`` tags, never layers.
"""

from megamoe.optim.config import OptimizerConfig
from megamoe.optim.optimizer import MixedPrecisionOptimizer, StepResult

__all__ = ["OptimizerConfig", "MixedPrecisionOptimizer", "StepResult"]
