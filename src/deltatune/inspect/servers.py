"""Can a serving engine load this adapter? Rules read from each server's own source, each cited.

The rules look only at ``adapter_config.json`` (as a plain dict, so adapters of any peft type are
checked) and the names of the saved tensors. They describe the server versions cited below; a
newer release may accept more, so every finding names where its rule comes from.

* vLLM: ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` refuses ``modules_to_save``
  and DoRA; ``validate_legal`` refuses r > ``--max-lora-rank``, default 16, and a bias without
  ``--enable-lora-bias`` in the versions that have that flag) and ``vllm/config/lora.py``
  (``MaxLoRARanks = 1, 8, 16, 32, 64, 128, 256, 320, 512``). PEFTHelper reads one ``r`` and one
  ``lora_alpha`` (it has no ``rank_pattern``/``alpha_pattern`` fields) and scales every module by
  alpha/r (alpha/sqrt(r) with rsLoRA). LoRA on ``embed_tokens``/``lm_head`` loads only for model
  classes that list them as ``embedding_modules`` (vllm-project/vllm#33234 adds them for Qwen2/3).
* TGI: ``server/text_generation_server/adapters/lora.py`` (taken from LoRAX,
  ``lorax/server/lorax_server/adapters/lora.py``): reads ``r``, ``lora_alpha``, ``use_rslora``,
  ``target_modules`` and ``fan_in_fan_out`` and only the ``lora_A.weight``/``lora_B.weight``
  tensors of each module, with one scaling for all of them; any other tensor is logged as
  "unused adapter weights" and ignored, so the served model differs from the trained one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM accepts for ``--max-lora-rank`` (vllm/config/lora.py, MaxLoRARanks)."""
VLLM_DEFAULT_MAX_RANK = 16
"""vLLM's default ``--max-lora-rank`` (vllm/config/lora.py)."""
PEFT_TYPES = ("LORA", "ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")
"""deltatune peft types that peft itself can load (BOTTLENECK, BITFIT and PARTIAL are deltatune's own)."""
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
"""Methods that change the model's inputs; they cannot be merged into the weights."""


def _instead(peft_type: Any) -> str:
    if peft_type in PROMPT_TYPES:
        return "prompt methods cannot be merged into the weights; serve it with transformers plus deltatune or peft"
    return "merge it into the base model (deltatune export) and serve that"
_PEFT_HELPER = "vllm/lora/peft_helper.py"
_TGI_LORA = "text-generation-inference server/text_generation_server/adapters/lora.py"


@dataclass(frozen=True)
class Finding:
    """One reason a server can, cannot, or can only with a flag load the adapter."""

    server: str
    """``peft``, ``vLLM`` or ``TGI/LoRAX``."""
    level: str
    """``error`` (will not load, or loads but serves different outputs), ``warning`` (needs a flag,
    or depends on the model or version), or ``ok``."""
    reason: str
    """What was found and what to do about it."""
    source: str
    """Where the rule comes from."""


def _ranks(config: dict[str, Any]) -> list[int]:
    values = [int(config.get("r") or 0)] + [int(v) for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int)]
    return [v for v in values if v > 0]


def _kinds(tensor_names: Iterable[str]) -> set[str]:
    kinds = set()
    for key in tensor_names:
        if key.endswith(("lora_A.weight", "lora_B.weight")):
            kinds.add("lora")
        elif key.endswith(("lora_embedding_A", "lora_embedding_B")):
            kinds.add("embedding")
        elif key.endswith("lora_magnitude_vector") or key.endswith("lora_magnitude_vector.weight"):
            kinds.add("dora")
        elif ".modules_to_save." in key or key.endswith(".bias") or key.endswith(".weight"):
            kinds.add("full")  # whole tensors: modules_to_save copies, trained biases, embedding matrices
        else:
            kinds.add("other")
    return kinds


def _lm_head_target(config: dict[str, Any]) -> bool:
    targets = config.get("target_modules")
    return isinstance(targets, list) and any(t in ("lm_head", "embed_tokens") for t in targets)


def peft_findings(config: dict[str, Any]) -> list[Finding]:
    """Whether HF peft can load the adapter (the on-disk format is peft's for every type it has)."""
    kind = str(config.get("peft_type"))
    if kind in PEFT_TYPES:
        return [Finding("peft", "ok", f"{kind} is a peft type; PeftModel.from_pretrained loads it", "deltatune/config.py")]
    return [Finding("peft", "error", f"{kind} is deltatune's own method; peft has no such peft_type. "
                    "Load it with deltatune, or " + _instead(kind), "deltatune/config.py")]


def vllm_findings(config: dict[str, Any], tensor_names: Iterable[str]) -> list[Finding]:
    """vLLM's rules (see the module docstring)."""
    out: list[Finding] = []

    def add(level: str, reason: str, source: str = _PEFT_HELPER) -> None:
        out.append(Finding("vLLM", level, reason, source))

    if config.get("peft_type") != "LORA":
        add("error", f"vLLM serves LoRA adapters only; this is {config.get('peft_type')}: "
            + _instead(config.get("peft_type")), "vllm/lora (LoRA only)")
        return out
    if config.get("use_dora"):
        add("error", "use_dora=True: vLLM does not yet support DoRA; train without DoRA or merge it (deltatune export)")
    if config.get("modules_to_save"):
        add("error", f"modules_to_save={config['modules_to_save']}: vLLM only supports modules_to_save being None; "
            "train without them, or merge (deltatune export)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        add("error", "rank_pattern/alpha_pattern: vLLM applies one scaling lora_alpha/r to every module (PEFTHelper has "
            "no per-module fields), so modules with their own rank or alpha would be scaled wrongly; merge instead")
    rank = max(_ranks(config), default=0)
    if rank > VLLM_RANKS[-1]:
        add("error", f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})", "vllm/config/lora.py")
    elif rank > VLLM_DEFAULT_MAX_RANK:
        flag = next(v for v in VLLM_RANKS if v >= rank)
        add("warning", f"rank {rank} > the default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: start vLLM with "
            f"--max-lora-rank {flag}", "vllm/config/lora.py")
    if config.get("bias", "none") != "none":
        add("warning", f"bias={config.get('bias')!r}: vLLM loads adapter biases only with --enable-lora-bias, in the "
            "versions that have that flag")
    if "embedding" in _kinds(tensor_names) or _lm_head_target(config):
        add("warning", "LoRA on embed_tokens/lm_head loads only for model classes that list them as embedding modules "
            "in vLLM (LLaMA does; Qwen2/3 only from vllm-project/vllm#33234)", "vllm model embedding_modules")
    if not any(f.level == "error" for f in out):
        add("ok", "start the server with --enable-lora --lora-modules NAME=ADAPTER_DIR")
    return out


def tgi_findings(config: dict[str, Any], tensor_names: Iterable[str]) -> list[Finding]:
    """TGI's (and LoRAX's) rules (see the module docstring)."""
    out: list[Finding] = []

    def add(level: str, reason: str) -> None:
        out.append(Finding("TGI/LoRAX", level, reason, _TGI_LORA))

    if config.get("peft_type") != "LORA":
        add("error", f"TGI serves LoRA adapters only; this is {config.get('peft_type')}: " + _instead(config.get("peft_type")))
        return out
    kinds = _kinds(tensor_names)
    ignored = {"dora": "DoRA magnitudes", "embedding": "embedding LoRA factors", "full": "whole tensors "
               "(modules_to_save copies, biases or embedding matrices)", "other": "other tensors"}
    for kind, what in ignored.items():
        if kind in kinds:
            add("error", f"the adapter saves {what}; TGI reads only lora_A/lora_B and ignores them "
                "(\"unused adapter weights\"), so it would serve a different model. Merge instead")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        add("error", "rank_pattern/alpha_pattern: TGI scales every module by one lora_alpha/r; merge instead")
    if not any(f.level == "error" for f in out):
        add("ok", "start with --lora-adapters NAME=ADAPTER_DIR; only modules TGI's model class adapts are applied "
            "(for LLaMA: q/k/v/o_proj, gate/up/down_proj, lm_head)")
    return out


def pissa_findings(config: dict[str, Any]) -> list[Finding]:
    """PiSSA/OLoRA move the base weight at initialisation; a server adds the adapter to the original weights."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        return [Finding("all", "warning", f"init_lora_weights={init!r} changed the base weights during training; servers "
                        "add the adapter to the original weights, so merge it (deltatune export) to serve it", "PiSSA/OLoRA")]
    return []


def server_findings(config: dict[str, Any], tensor_names: Iterable[str]) -> list[Finding]:
    """Every finding for peft, vLLM and TGI/LoRAX, server by server."""
    names = list(tensor_names)
    return peft_findings(config) + vllm_findings(config, names) + tgi_findings(config, names) + pissa_findings(config)
