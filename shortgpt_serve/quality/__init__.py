"""Quality of a (shortened) model: zero-shot benchmarks scored by log-likelihood, and held-out perplexity.

- :mod:`~shortgpt_serve.quality.tasks`: the tasks and their items (real data, offline);
- :mod:`~shortgpt_serve.quality.scoring`: log-likelihoods and task scores on the pass engine;
- :mod:`~shortgpt_serve.quality.perplexity`: held-out perplexity on the pass engine;
- :mod:`~shortgpt_serve.quality.retained`: the share of the full model's quality kept, with its noise;
- :mod:`~shortgpt_serve.quality.meter`: the full model's cached scores and candidates', a pass per call.
"""

from shortgpt_serve.quality.perplexity import perplexity
from shortgpt_serve.quality.retained import SIGNAL_SE, Retained, quality_retained, signal_margin
from shortgpt_serve.quality.scoring import TaskScore, encode_request, loglikelihoods, score_items
from shortgpt_serve.quality.tasks import DEFAULT_TASKS, TASKS, Item, Request, TaskSpec, chance, load_items

__all__ = [
    "DEFAULT_TASKS",
    "SIGNAL_SE",
    "TASKS",
    "Item",
    "Request",
    "Retained",
    "TaskScore",
    "TaskSpec",
    "chance",
    "encode_request",
    "load_items",
    "loglikelihoods",
    "perplexity",
    "quality_retained",
    "score_items",
    "signal_margin",
]
