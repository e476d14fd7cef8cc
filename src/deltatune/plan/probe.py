"""Measure the memory of real training steps, in a fresh process, to check or calibrate the estimate.

What "measured peak" means here, precisely:

* **CPU**: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) over
  the training steps, minus the resident set right after the imports (before any model exists).
  The model is built (randomly initialised from its config: the same bytes as loaded weights),
  the adapter attached and the optimizer created; then freed heap is returned to the OS
  (``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``), so transient
  memory used while *building* (e.g. the fp32 weights QLoRA quantizes away) does not count.
  The peak is then taken over ``steps`` full steps (forward, backward, optimizer step,
  ``zero_grad``); the first step allocates the optimizer state, so two steps see the steady state.
  One intra-op thread is used, so per-thread allocator arenas stay out of the figure.
* **CUDA**: ``torch.cuda.max_memory_allocated()`` over the same steps (the model is on the GPU and
  nothing else is; the CUDA context itself is not in that figure and is reported separately by the
  estimate as part of its overhead term).

Each measurement runs in its own ``python -m deltatune.plan.probe`` process, so one configuration's
allocations and allocator state cannot leak into the next.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from deltatune.methods.base import get_method
from deltatune.model import get_peft_model
from deltatune.models.checkpointing import enable_activation_checkpointing
from deltatune.plan.memory import resolve_loss
from deltatune.plan.meta import load_model_config
from deltatune.plan.setup import TrainSetup, peft_config_for
from deltatune.quant import QuantConfig, prepare_model_for_kbit_training, quantize_model
from deltatune.train.loss import causal_lm_loss


@dataclass(frozen=True)
class Measurement:
    """The measured memory of a few training steps."""

    peak_bytes: int
    """Peak memory of the training steps, as defined in this module's docstring."""

    baseline_bytes: int
    """Resident set after the imports (CPU) or allocated bytes before the model (CUDA)."""

    static_bytes: int
    """Memory held just before the first step: weights, adapter and (empty) optimizer."""

    phase_peaks: dict[str, int]
    """Peak so far above baseline at the end of each phase, keyed ``"<step>.<phase>"`` (phases:
    forward, backward, step); shows which phase sets the peak."""

    loss: float
    """Loss of the last step (a sanity check that training ran)."""

    seconds: float
    """Wall time of the measured steps."""

    device: str
    """``cpu`` or ``cuda``."""


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; memory probing on CPU needs Linux")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 64 * 1024
"""Allocations at least this large get their own mapping, returned to the OS when freed."""


def _live_memory_allocator() -> None:
    """Make RSS track live memory: blocks >= 64 KiB are mmapped and unmapped on free.

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), after
    which freed tensors stay in the heap and RSS keeps whatever the largest past moment needed,
    plus fragmentation. A fixed threshold makes the CPU figure the peak of live allocations, the
    counterpart of CUDA's ``max_memory_allocated``.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed heap may stay resident and inflate the figure slightly
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build_training_model(model_source: Any, setup: TrainSetup) -> tuple[Any, list[Any]]:
    """A real (randomly initialised) model prepared as ``setup`` says, and its trainable parameters.

    Used by the probe and by ``deltatune tune``'s memory check; loads no weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(model_source)
    model = AutoModelForCausalLM.from_config(config)
    device = "cuda" if setup.device == "cuda" else "cpu"
    dtype = getattr(torch, setup.dtype)
    if setup.method != "full":
        model.to(device=device, dtype=dtype)
    else:
        model.to(device)  # fp32 master weights; the forward runs under autocast when dtype is lower
    if setup.method == "qlora":
        quantize_model(model, QuantConfig(blocksize=setup.quant_blocksize, double_quant=setup.double_quant,
                                          compute_dtype=setup.dtype))
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_checkpointing)
    elif setup.grad_checkpointing:
        enable_activation_checkpointing(model)
        if setup.method != "full":
            model.enable_input_require_grads()
    peft_config = peft_config_for(setup, model)
    if peft_config is None:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, peft_config)
        for p in model.parameters():
            if p.requires_grad:  # adapters train in fp32 (peft's autocast_adapter_dtype)
                p.data = p.data.float()
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _loss(model: Any, ids: Any, setup: TrainSetup) -> Any:
    if resolve_loss(setup, getattr(model, "config", None)) == "fused":
        return causal_lm_loss(model, input_ids=ids, labels=ids)[0]
    return model(input_ids=ids, labels=ids).loss


def measure(model_source: Any, setup: TrainSetup, steps: int = 2, seed: int = 0) -> Measurement:
    """Run ``steps`` training steps in *this* process and measure them (see the module docstring).

    Call it in a fresh process (:func:`probe` does) right after the imports: the baseline is read
    when it is called.
    """
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cuda = setup.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("setup.device is 'cuda' but no CUDA device is available; probe with device='cpu'.")
    if setup.optimizer == "adamw8bit":
        raise ValueError("the probe runs torch's AdamW or SGD; estimate adamw8bit without --probe.")
    _warm_imports(model_source, setup)
    if not cuda:
        _live_memory_allocator()
    _trim()
    baseline = torch.cuda.memory_allocated() if cuda else _status_kb("VmRSS")

    def used() -> int:
        return (torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM")) - baseline

    model, params = build_training_model(model_source, setup)
    optimizer = (torch.optim.AdamW(params, lr=1e-4) if setup.optimizer == "adamw" else torch.optim.SGD(params, lr=1e-3))
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (setup.batch_size, setup.seq_len), device="cuda" if cuda else "cpu")
    _trim()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    static = used()
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=getattr(torch, setup.dtype),
                              enabled=setup.dtype != "float32")
    phases: dict[str, int] = {}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        with autocast:
            loss = _loss(model, ids, setup)
        phases[f"{step}.forward"] = used()
        loss.backward()
        phases[f"{step}.backward"] = used()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases[f"{step}.step"] = used()
    seconds = time.perf_counter() - start
    return Measurement(peak_bytes=used(), baseline_bytes=baseline, static_bytes=static, phase_peaks=phases,
                       loss=float(loss.detach()), seconds=seconds, device="cuda" if cuda else "cpu")


def _warm_imports(model_source: Any, setup: TrainSetup) -> None:
    """Import every module the steps will need, so module code is part of the baseline."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(load_model_config(model_source))]  # imports modeling_<family>
    for peft_type in ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK"):
        get_method(peft_type)


def _model_arg(model_source: Any) -> Any:
    """Something JSON can carry to the child process: a name/path, or a config as a dict."""
    from transformers import PretrainedConfig

    if isinstance(model_source, PretrainedConfig):
        return model_source.to_dict()
    if isinstance(model_source, os.PathLike):
        return os.fspath(model_source)
    return model_source


def probe(model_source: Any, setup: TrainSetup, steps: int = 2, timeout: float = 1800,
          fork: bool = False) -> Measurement:
    """Measure ``steps`` real training steps of ``setup`` in a fresh Python process.

    Args:
        model_source: a registered name, a model folder, a config dict or a ``PretrainedConfig``.
        setup: the configuration to run (``device="cpu"`` measures RSS, ``"cuda"`` the allocator).
        steps: training steps; the peak is over all of them.
        timeout: seconds before the child is killed.
        fork: fork this process instead of starting a new interpreter (Linux, CPU only). The
            child still has its own address space and allocator, and measures from its own
            baseline; it just skips re-importing torch and transformers (what tests want).

    Returns:
        The :class:`Measurement`.

    Raises:
        RuntimeError: the child process failed; its error is in the message.
    """
    if fork and setup.device == "cpu":
        return _probe_forked(model_source, setup, steps, timeout)
    payload = json.dumps({"model": _model_arg(model_source), "setup": dataclasses.asdict(setup), "steps": steps})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "deltatune.plan.probe", payload], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(lines[-1]))


def _forked_child(conn: Any, model_source: Any, setup: TrainSetup, steps: int) -> None:
    try:
        conn.send(("ok", dataclasses.asdict(measure(model_source, setup, steps=steps))))
    except BaseException as err:  # report anything to the parent rather than dying silently
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def _probe_forked(model_source: Any, setup: TrainSetup, steps: int, timeout: float) -> Measurement:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_forked_child, args=(child, model_source, setup, steps), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"memory probe did not finish within {timeout:.0f} s")
        status, payload = parent.recv()
    except EOFError:
        raise RuntimeError(f"memory probe process died (exit code {proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"memory probe failed: {payload}")
    return Measurement(**payload)


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = measure(spec["model"], TrainSetup(**spec["setup"]), steps=spec["steps"])
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    # Import the heavy modules before measure() reads its baseline.
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from transformers import AutoModelForCausalLM  # noqa: F401
    sys.exit(_main(sys.argv[1:]))
