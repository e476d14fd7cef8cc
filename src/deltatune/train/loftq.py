"""LoftQ in ``deltatune train``: ``method.name: qlora`` with ``method.init_lora_weights: loftq``.

QLoRA runs quantize the base model as it loads, and LoftQ needs the full-precision weights the
quantization replaces. :func:`keep_dense_weights` holds them (references to the loaded tensors, no
copy) just before :func:`deltatune.quant.quantize_model`; :func:`wrap` then wraps the quantized model
with the plain initialisation and runs :func:`deltatune.replace_lora_weights_loftq` with those weights,
and lets them go. Each 4-bit layer is its own quantizer, so the adapter is fitted against exactly the
quantization the run computes with (``quant.blocksize``, ``quant.double_quant``, ``quant.quant_type``).

Only ``loftq_iter: 1`` is accepted here: with one step the layer keeps its ordinary quantization Q(W),
so the saved adapter (written with ``init_lora_weights: true``) fits the quantized base that
``deltatune eval``/``generate`` or a bitsandbytes load rebuilds from the same checkpoint. More steps would
leave the base at a Q_T that nothing rebuilds from the checkpoint. ``method.name: lora`` with
``init_lora_weights: loftq`` takes any number of steps, with peft's semantics (the dense base weight
becomes the dequantized Q_T, and loading the adapter redoes it).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from torch import nn

from deltatune.lora_options import as_loftq_dict
from deltatune.methods.lora_loftq import replace_lora_weights_loftq
from deltatune.model import get_peft_model
from deltatune.train.config_check import ConfigError

_DENSE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def loftq_run(config: Any) -> bool:
    """Whether the run is QLoRA with LoftQ initialisation."""
    return config.method.spec.quantized and config.method.options.get("init_lora_weights") == "loftq"


def check_loftq(config: Any) -> None:
    """The QLoRA + LoftQ options that work together, checked before anything loads.

    Raises:
        ConfigError: ``loftq_iter`` is not 1, or ``loftq_bits`` is not ``quant.bits``.
    """
    if not loftq_run(config):
        return
    loftq = as_loftq_dict(config.method.options.get("loftq_config") or {})
    if loftq["loftq_iter"] != 1:
        raise ConfigError(
            f"method.loftq_config.loftq_iter={loftq['loftq_iter']} with method.name=qlora: only 1 step is supported, "
            "because more steps change the quantized base itself and the saved adapter would no longer fit the base "
            "that loading the checkpoint quantized rebuilds. Set loftq_iter: 1, or use method.name=lora with "
            "init_lora_weights: loftq (peft's semantics: the base weights become the dequantized LoftQ quantization)."
        )
    if loftq["loftq_bits"] != config.quant.bits:
        raise ConfigError(
            f"method.loftq_config.loftq_bits={loftq['loftq_bits']} but quant.bits={config.quant.bits}: LoftQ fits the "
            "adapter against the run's own quantization; set them equal."
        )


def keep_dense_weights(model: nn.Module, config: Any) -> None:
    """Before quantization: keep the full-precision Linear weights for :func:`wrap` (a LoftQ run only)."""
    if loftq_run(config):
        check_loftq(config)
        _DENSE[model] = {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def wrap(model: nn.Module, peft_config: Any, log: Callable[[str], None] = print) -> Any:
    """``get_peft_model``, with LoftQ on the quantized layers when :func:`keep_dense_weights` kept weights."""
    dense = _DENSE.pop(model, None)
    if dense is None or getattr(peft_config, "init_lora_weights", None) != "loftq":
        return get_peft_model(model, peft_config)
    loftq_iter = peft_config.loftq_config["loftq_iter"]
    # saved as a plain LoRA: loading must not redo LoftQ (the base it fits is the ordinary quantized one)
    peft_model = get_peft_model(model, peft_config.replace(init_lora_weights=True, loftq_config={}))
    done = replace_lora_weights_loftq(peft_model, dense, loftq_iter=loftq_iter)
    log(f"LoftQ: initialised the adapter on {len(done)} quantized layers against their own quantization")
    return peft_model
