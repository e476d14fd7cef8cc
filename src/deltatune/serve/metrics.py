"""Counters and gauges of a running server, rendered in Prometheus' text format for ``GET /metrics``.

Written by the scheduler thread and the HTTP handlers, read by scrapes: every update takes one lock,
and a scrape renders a consistent snapshot.
"""
from __future__ import annotations

import threading
from collections import Counter

# name -> (type, help); the order here is the order of the scrape
_FAMILIES = {
    "deltatune_requests_total": ("counter", "Requests finished, by outcome (ok, error, cancelled, rejected)."),
    "deltatune_prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "deltatune_generation_tokens_total": ("counter", "Tokens generated."),
    "deltatune_queue_length": ("gauge", "Requests waiting to join the running batch."),
    "deltatune_batch_size": ("gauge", "Sequences in the running batch now."),
    "deltatune_batch_size_max": ("gauge", "Largest running batch so far."),
    "deltatune_decode_steps_total": ("counter", "Decode steps (one forward each, for every running sequence)."),
    "deltatune_decode_rows_total": ("counter", "Sequences summed over decode steps (divide by steps: mean batch size)."),
    "deltatune_mixed_adapter_steps_total": ("counter", "Decode steps whose batch held more than one adapter (or base)."),
    "deltatune_prefill_batches_total": ("counter", "Prefill forwards (each for the requests joining at one step)."),
    "deltatune_adapters_loaded": ("gauge", "Adapters being served (resident in a slot or not)."),
    "deltatune_adapters_resident": ("gauge", "Adapters in a bank slot now."),
    "deltatune_adapter_loads_total": ("counter", "Adapter weights written into a slot (first use or after eviction)."),
    "deltatune_evictions_total": ("counter", "Adapters evicted from a slot, least recently used first."),
}


class Metrics:
    """The server's numbers; ``inc`` and ``set`` from any thread, ``render`` for a scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter[tuple[str, str]] = Counter()  # (name, label text) -> value

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._check(name)
        with self._lock:
            self._values[(name, _labels(labels))] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._check(name)
        with self._lock:
            self._values[(name, _labels(labels))] = value

    def set_max(self, name: str, value: float) -> None:
        self._check(name)
        with self._lock:
            key = (name, "")
            self._values[key] = max(self._values[key], value)

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[(name, _labels(labels))]

    def render(self) -> str:
        """Every family, with its HELP and TYPE lines; families never updated show 0."""
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, (kind, help_text) in _FAMILIES.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            samples = sorted((labels, v) for (n, labels), v in values.items() if n == name)
            for labels, v in samples or [("", 0)]:
                lines.append(f"{name}{labels} {_number(v)}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _check(name: str) -> None:
        if name not in _FAMILIES:
            raise KeyError(f"unknown metric {name!r}; declare it in deltatune.serve.metrics._FAMILIES")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
