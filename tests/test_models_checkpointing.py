"""enable_activation_checkpointing: turns checkpointing on without transformers' deprecation warning."""
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.models.checkpointing import enable_activation_checkpointing


def test_checkpointing_is_on_and_gradients_still_flow():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would warn
        enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
