"""shortgpt-serve: deploy ShortGPT-shortened LLMs on vLLM.

The pipeline, one module per stage::

    calibration -> profile (Block Influence) -> selection (budget) -> checkpoint (write) -> serve (vLLM) -> metrics
"""

from shortgpt_serve.checkpoint import write_checkpoint
from shortgpt_serve.profile import LayerProfile, block_influence, profile_layers, profile_model
from shortgpt_serve.selection import CostModel, select_depth
from shortgpt_serve.serve import serve
from shortgpt_serve.version import __version__

__all__ = [
    "CostModel",
    "LayerProfile",
    "__version__",
    "block_influence",
    "profile_layers",
    "profile_model",
    "select_depth",
    "serve",
    "write_checkpoint",
]
