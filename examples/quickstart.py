"""Quickstart: wrap a model with LoRA, train a few steps, save in peft's format, reload, compare.

Runs in seconds on a CPU with a small randomly initialised LLaMA-shaped model (no download).
"""
import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
pristine = copy.deepcopy(base)  # get_peft_model wraps `base` in place; keep an untouched copy to reload onto
config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type=TaskType.CAUSAL_LM)
model = get_peft_model(base, config)
model.print_trainable_parameters()

data = torch.randint(0, 256, (8, 32))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(20):
    loss = model(input_ids=data, labels=data).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")

model.eval()
with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(pristine, out)
    diff = (reloaded(data).logits - model(data).logits).abs().max().item()
    print(f"saved to {out}; reloaded adapter max |Δlogits| = {diff:.2e}")
