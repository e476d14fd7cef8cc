"""LoftQ: how far the 4-bit start Q + s·B·A is from the full-precision weights, against plain QLoRA.

Runs in seconds on a CPU with a small randomly initialised LLaMA-shaped model (no download). Prints
the relative error ||W - (Q + s·B·A)|| / ||W|| over the wrapped layers for plain QLoRA (B = 0) and
for LoftQ with 1 to 5 alternating steps, both ways deltatune offers it:

- ``init_lora_weights="loftq"`` on the full-precision model (peft's semantics: W becomes Q);
- ``replace_lora_weights_loftq`` on a model quantized with deltatune (double quantization here).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import LoftQConfig, LoraConfig, get_peft_model, replace_lora_weights_loftq
from deltatune.quant import QuantConfig, quantize_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


dense = {n: m.weight.detach().clone() for n, m in base().named_modules() if isinstance(m, torch.nn.Linear)}
wrapped = [n for n in dense if n.split(".")[-1] in TARGETS]
norm = sum(dense[n].square().sum() for n in wrapped).sqrt()


@torch.no_grad()
def relative_error(model) -> float:
    layers = dict(model.get_base_model().named_modules())
    total = 0.0
    for name in wrapped:
        host = layers[name]
        Q = host.base_layer.dequantize_weight(torch.float32) if hasattr(host.base_layer, "dequantize_weight") else host.base_layer.weight
        total += (dense[name] - Q - host.adapters["default"].delta_weight(host.base_layer)).square().sum()
    return float(total.sqrt() / norm)


lora = dict(r=8, lora_alpha=16, target_modules=TARGETS)
quantized = QuantConfig(bits=4, double_quant=True)
plain = get_peft_model(quantize_model(base(), quantized), LoraConfig(**lora))
print(f"plain QLoRA start (B = 0):                  {relative_error(plain):.4f}")
for steps in (1, 2, 3, 5):
    peft_way = get_peft_model(base(), LoraConfig(**lora, init_lora_weights="loftq",
                                                 loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=steps)))
    qlora_way = get_peft_model(quantize_model(base(), quantized), LoraConfig(**lora))
    replace_lora_weights_loftq(qlora_way, dense, loftq_iter=steps)
    print(f"LoftQ, {steps} step(s): dense base {relative_error(peft_way):.4f}   deltatune 4-bit layers {relative_error(qlora_way):.4f}")
