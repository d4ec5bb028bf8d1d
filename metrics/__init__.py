"""Prometheus metrics: vLLM's names for the engine, `chatllm_` ones for everything around it.

`metrics.registry.Metrics` holds the instruments; `metrics.counters.Tally` is
what services count with (no Prometheus import there).
"""
