"""Planning a fine-tuning run before it runs: exact parameter counts, a memory model, recommendations.

Everything works from a model's config alone (a meta-device model: no weights are read), so an
8B or 70B model is planned in seconds on any machine::

    from deltatune.plan import TrainSetup, count_parameters, estimate_memory, recommend

    count_parameters("smollm2-135m-instruct", "lora", r=16)          # ParamCount(trainable, total)
    est = estimate_memory("smollm2-135m-instruct", TrainSetup(method="qlora", batch_size=4, seq_len=1024))
    print(est.table())                                                # the breakdown, peak phase
    rec = recommend("smollm2-135m-instruct", device_memory=8 * 2**30, dataset_size=5000, task="qa")
    print(rec.table()); rec.write_config("train.yaml")

:func:`deltatune.plan.probe.probe` measures real training steps in a fresh process to check the
estimate (``deltatune plan --probe``).
"""
from deltatune.plan.memory import MemoryComponent, MemoryEstimate, estimate_memory, resolve_loss
from deltatune.plan.meta import ParamCount, count_parameters
from deltatune.plan.recommend import QUALITIES, TASKS, Recommendation, recommend, recommend_lora_rank
from deltatune.plan.report import fmt_bytes, parse_bytes
from deltatune.plan.setup import METHODS, TARGET_PRESETS, TrainSetup

__all__ = [
    "METHODS", "MemoryComponent", "MemoryEstimate", "ParamCount", "QUALITIES", "Recommendation", "TARGET_PRESETS",
    "TASKS", "TrainSetup", "count_parameters", "estimate_memory", "fmt_bytes", "parse_bytes", "recommend",
    "recommend_lora_rank", "resolve_loss",
]
