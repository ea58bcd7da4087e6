"""shortgpt-serve: deploy ShortGPT-shortened LLMs on vLLM.

The pipeline, one module per stage (``pipeline.prepare`` chains them; ``serving.launch`` serves the result)::

    calibration -> profile (Block Influence) -> selection (budget) -> checkpoint (write) -> serving (vLLM) -> metrics
                                                   ^ quality (full model vs candidates)

Every pass over a model's weights (profiling, scoring, perplexity) runs on the layer-by-layer pass engine
(``passes.PassEngine``), which finds the weights through a placement (``placement``).
"""

from shortgpt_serve.checkpoint import verify_checkpoint, write_checkpoint
from shortgpt_serve.config import Config
from shortgpt_serve.passes import Batch, PassEngine, Route
from shortgpt_serve.pipeline import Prepared, prepare
from shortgpt_serve.profile import LayerProfile, block_influence, profile_layers, profile_model
from shortgpt_serve.selection import CostModel, select_depth
from shortgpt_serve.serving.launch import launch
from shortgpt_serve.serving.serve import serve
from shortgpt_serve.version import __version__

__all__ = [
    "Batch",
    "Config",
    "CostModel",
    "LayerProfile",
    "PassEngine",
    "Prepared",
    "Route",
    "__version__",
    "block_influence",
    "launch",
    "prepare",
    "profile_layers",
    "profile_model",
    "select_depth",
    "serve",
    "verify_checkpoint",
    "write_checkpoint",
]
