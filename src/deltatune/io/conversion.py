"""Converting an adapter on its way to disk: a PiSSA/OLoRA adapter written as a LoRA on the original weights."""
from __future__ import annotations

from pathlib import Path

from deltatune.config import PeftConfig, PeftType
from deltatune.io import checkpoint as ckpt
from deltatune.io.config_io import load_config, save_config
from deltatune.methods.lora_init import mutated_to_lora


def mutated_to_lora_on_save(sd: dict, config: PeftConfig, initial: Path) -> tuple[dict, PeftConfig]:
    """peft's ``path_initial_model_for_weight_conversion``: ``sd`` (trained) against the adapter saved in
    ``initial`` before training, as a LoRA of twice the rank (see ``methods.lora_init.mutated_to_lora``)."""
    if config.peft_type != PeftType.LORA:
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA, OLoRA); this one is {config.peft_type.value}"
        )
    sd, converted = mutated_to_lora(sd, ckpt.load_weights(initial), config)
    # As peft does: the initial folder's config no longer asks for PiSSA/OLoRA, so loading it does not move W again.
    save_config(load_config(initial).replace(init_lora_weights=True), initial)
    return sd, converted
