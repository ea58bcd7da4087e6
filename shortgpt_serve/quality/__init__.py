"""Quality of a (shortened) model: zero-shot benchmarks scored by log-likelihood, LAMBADA last words, held-out
perplexity, and how far its next-token distribution lies from the full model's.

- :mod:`~shortgpt_serve.quality.tasks`: the tasks and their items (real data, offline);
- :mod:`~shortgpt_serve.quality.scoring`: log-likelihoods and task scores on the pass engine;
- :mod:`~shortgpt_serve.quality.perplexity`: held-out perplexity on the pass engine;
- :mod:`~shortgpt_serve.quality.divergence`: KL and top-1 agreement with the full model on the held-out text;
- :mod:`~shortgpt_serve.quality.lambada`: LAMBADA last-word greedy accuracy, a generative measure;
- :mod:`~shortgpt_serve.quality.retained`: the share of the full model's quality kept, with its noise;
- :mod:`~shortgpt_serve.quality.bootstrap`: a paired bootstrap confidence interval for that share;
- :mod:`~shortgpt_serve.quality.record`: the quality record every consumer reads;
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
