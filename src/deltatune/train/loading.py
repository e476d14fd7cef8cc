"""Loading a training run's pieces before any training starts: the tokenizer, the data, the base model,
and the checks that can fail before the weights load. Light to import (no transformers Trainer), so the
commands that only load (``deltatune eval``, ``plan``) start fast.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

from deltatune.config import PeftType, TaskType
from deltatune.data import prepare_datasets, validate_data
from deltatune.data.pipeline import PreparedData, load_examples
from deltatune.inspect.architecture import meta_model
from deltatune.models import load_model_and_tokenizer, model_config
from deltatune.models.cache import read_marker
from deltatune.models.checkpointing import enable_activation_checkpointing
from deltatune.models.loader import resolve_model_path
from deltatune.models.registry import get_spec
from deltatune.models.tokenizer import normalize_tokenizer, sync_special_token_ids
from deltatune.quant import Linear4bit, Linear8bit, load_quantized, prepare_model_for_kbit_training, quantize_model
from deltatune.quant.loading import shard_files
from deltatune.registry import get_method
from deltatune.surgery.targets import resolve_targets
from deltatune.train.config import TrainConfig
from deltatune.train.config_check import ConfigError
from deltatune.train.distributed import apply_fsdp_section, engine, fsdp_load_kwargs, shard_quantized
from deltatune.train.precision import choose_precision
from deltatune.train.new_tokens import add_tokens
from deltatune.train.launch import world_info
from deltatune.train.loftq import check_loftq, keep_dense_weights, loftq_run


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer with deltatune's fixes, without loading any weights.

    A registered GGUF model is converted into its cache folder first if needed (~20 s, once).
    """
    folder = resolve_model_path(name_or_path)
    marker = read_marker(folder) or {}
    spec = get_spec(name_or_path) or (get_spec(marker["model_name"]) if marker.get("model_name") else None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    normalize_tokenizer(tokenizer, spec)
    return tokenizer


def prepare_data(config: TrainConfig, log: Callable[[str], None] = print) -> tuple[Any, PreparedData]:
    """Validate, render and tokenize the data with the tokenizer only: every data error surfaces here.

    Returns:
        ``(tokenizer, prepared data)``.

    Raises:
        FileNotFoundError, ValueError: a missing file or column, an empty dataset, a template error.
    """
    examples = validate_data(config.data)  # no tokenizer: fails fast on files, columns, emptiness
    tokenizer = load_tokenizer(config.model)
    added = add_tokens(tokenizer, config.data.add_special_tokens)  # before tokenizing: each stays one token
    if added:
        log(f"added {len(added)} special token(s) to the tokenizer: ids {added}")
    if config.data.is_builtin:
        examples = load_examples(config.data, tokenizer)  # article budget measured in this tokenizer's tokens
    prepared = prepare_datasets(config.data, tokenizer, examples)
    if len(prepared.train) == 0:
        raise ValueError(f"No training example is left after tokenizing {config.data.source!r} "
                         f"({prepared.train_stats.summary()}); raise data.max_length or check the data.")
    log(f"data: {config.data.source} with template {prepared.template!r}; train {prepared.train_stats.summary()}"
        + (f"; eval {prepared.eval_stats.summary()}" if prepared.eval_stats else ""))
    return tokenizer, prepared


def total_steps(config: TrainConfig, n_rows: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``epochs`` passes over ``n_rows`` rows."""
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_rows / t.batch_size) / t.grad_accum))  # as Trainer counts them
    return max(1, math.ceil(per_epoch * t.epochs))


def adapter_config(config: TrainConfig, steps: int) -> Any:
    """``config.method`` built for a run of ``steps``: a relative ``layers_to_transform`` (``upper_half``)
    resolved against the model's decoder layer count, read from its config (no weights load).

    Raises:
        ConfigError: the model's config names no layer count, or the method's options are invalid.
    """
    layers = None
    if config.method.relative_layers:
        layers = getattr(model_config(config.model), "num_hidden_layers", None)
        if not isinstance(layers, int):
            raise ConfigError(f"method.layers_to_transform={config.method.options['layers_to_transform']!r} needs the "
                              f"number of decoder layers, which {config.model}'s config does not give "
                              "(num_hidden_layers); list the layer indices instead.")
    return config.method.build(total_steps=steps, num_layers=layers)


def wants_accuracy(config: TrainConfig, prepared: PreparedData) -> bool:
    """Whether to score label accuracy (``eval.accuracy``; ``auto``: the eval data has labels).

    Raises:
        ValueError: ``eval.accuracy: true`` but there is no eval split or no ``label`` column.
    """
    has = prepared.eval is not None and "label" in prepared.eval.column_names and len(prepared.eval) > 0
    if config.eval.accuracy is True and not has:
        raise ValueError("eval.accuracy is true but the eval data has no 'label' column (or no eval split); "
                         "add a label column, set data.eval_size > 0, or set eval.accuracy=auto.")
    return has if config.eval.accuracy == "auto" else bool(config.eval.accuracy)


def check_quantized_support(config: TrainConfig) -> None:
    """QLoRA needs deltatune.quant and a LoRA that wraps its 4-bit layers; check before loading anything.

    Raises:
        ValueError: either is missing, with what to do instead.
    """
    if not config.method.spec.quantized:
        return
    check_loftq(config)
    wanted = Linear4bit if config.quant.bits == 4 else Linear8bit
    if not issubclass(wanted, get_method(PeftType.LORA).layer_types):
        raise ValueError(
            f"method.name=qlora: LoRA in this deltatune build cannot wrap {wanted.__name__} layers. Use "
            "method.name=lora, or update deltatune."
        )


def check_targets(config: TrainConfig, peft_config: Any) -> None:
    """Resolve the method's targets on the model built from its config on the meta device (no weights).

    A ``target_modules`` typo then costs a second, not a model load. Methods that wrap no layers by
    name (prompt and prefix tuning, BitFit, partial fine-tuning) have nothing to check here.

    Raises:
        ConfigError: a target matches nothing or a layer the method cannot wrap; the message lists the
            layers that exist, with the closest match.
    """
    method = get_method(peft_config.peft_type)
    if method.make_adapter is None:
        return
    model = meta_model(model_config(config.model), TaskType.CAUSAL_LM)
    try:
        prepared = method.prepare(peft_config, model)
        resolve_targets(model, prepared)
    except ValueError as err:
        raise ConfigError(f"Config key 'method.target_modules' does not fit {config.model}: {err}") from None


def load_model(config: TrainConfig, log: Callable[[str], None] = print) -> Any:
    """The base model, quantized to 4 bits for QLoRA and with gradient checkpointing if asked."""
    world = world_info()
    fsdp = engine(config.train.distributed, world.world_size) == "fsdp"
    quantized = config.method.spec.quantized
    bf16 = choose_precision(config.train.bf16).bf16
    # Under torchrun/mpirun/srun each rank loads onto its own GPU (its local rank), not all onto cuda:0;
    # transformers places FSDP's shards itself.
    device = f"cuda:{world.local_rank}" if torch.cuda.is_available() and not fsdp else None
    sharded = fsdp_load_kwargs(config.train.fsdp, world.world_size, bf16) if fsdp and not quantized else {}
    streamed = _streamed_quantized(config, device) if quantized and not fsdp and not loftq_run(config) else None
    if streamed is not None:
        model = streamed
        log(f"loaded the linear layers as {config.quant.bits}-bit {config.quant.quant_type}, one tensor at a time (QLoRA)")
    else:
        model, _ = load_model_and_tokenizer(config.model, dtype=getattr(torch, config.model_dtype), device=device, **sharded)
    if fsdp and not quantized:
        apply_fsdp_section(model, config.train.fsdp)
        log(f"FSDP2: loaded sharded over {world.world_size} processes (transformers' DistributedConfig)")
    if quantized and streamed is None:
        keep_dense_weights(model, config)  # LoftQ fits the adapter against these (train/loftq.py)
        quantize_model(model, config.quant)
        log(f"quantized the linear layers to {config.quant.bits}-bit {config.quant.quant_type} (QLoRA)")
    if quantized:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
        if fsdp:
            shard_quantized(model, config.train.fsdp, bf16)
            log(f"FSDP2: the quantized model sharded over {world.world_size} processes")
    elif config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
        enable_activation_checkpointing(model)
    return model


def _streamed_quantized(config: TrainConfig, device: str | None) -> Any:
    """The QLoRA base read by :func:`deltatune.quant.load_quantized`, or None where a whole load is needed.

    Loading the full-precision model and then quantizing it held all of its weights at once: for a 4-bit
    run, 4-8x the memory its base needs (SmolLM2: the 538 MB fp32 model, for a 190 MB 4-bit one). Streaming
    quantizes each weight as it is read. It needs safetensors; a folder of ``.bin`` weights loads whole.
    On a GPU the model is quantized on the CPU and then moved, so the GPU never holds the fp32 weights.
    """
    folder = resolve_model_path(config.model)
    try:
        shard_files(folder)
    except FileNotFoundError:
        return None
    model = load_quantized(folder, config.quant, dtype=getattr(torch, config.model_dtype))
    sync_special_token_ids(model, load_tokenizer(config.model))  # as load_model_and_tokenizer does
    return model if device is None else model.to(device)
