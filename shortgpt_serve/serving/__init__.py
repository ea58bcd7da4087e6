"""Serving the shortened checkpoint, and measuring it against the full model for ops.

- :mod:`~shortgpt_serve.serving.serve`: the vLLM OpenAI-compatible server as a supervised child process;
- :mod:`~shortgpt_serve.serving.launch`: the launcher: comparison, metrics and engine supervision together;
- :mod:`~shortgpt_serve.serving.compare`: the side-by-side benchmark of the full and the shortened model;
- :mod:`~shortgpt_serve.serving.workload`: that benchmark's seeded workload and streaming client;
- :mod:`~shortgpt_serve.serving.benchrun`: its typed results and ratios;
- :mod:`~shortgpt_serve.serving.metrics`: the launcher's Prometheus metrics.
"""
