"""Models in: what the user named resolved to a local safetensors folder, checked, converted, loaded.

- :mod:`~shortgpt_serve.models.source`: ``--model`` (folder, hub id, GGUF, the embedded default) as a
  :class:`ModelSource`, with its input checks;
- :mod:`~shortgpt_serve.models.convert`: GGUF and pickle inputs converted once into the cache;
- :mod:`~shortgpt_serve.models.loading`: the model and tokenizer loaded for profiling and scoring;
- :mod:`~shortgpt_serve.models.families`: the supported families and their per-layer config;
- :mod:`~shortgpt_serve.models.weights`: safetensors headers, shapes and byte-range copies;
- :mod:`~shortgpt_serve.models.layers`: a loaded model's decoder layers, and running it without some.
"""

from shortgpt_serve.models.source import ModelSource, resolve_model

__all__ = ["ModelSource", "resolve_model"]
