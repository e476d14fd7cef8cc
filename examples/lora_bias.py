"""LoRA with a trainable bias on lora_B (peft's ``lora_bias=True``), as some published adapters use.

The bias trains with the adapter, is saved under peft's keys (``lora_B.bias``) and is folded into the
base layer's bias on merge, so the base layers need a bias (GPT-2's do; LLaMA's do not). Runs in
seconds on a small random GPT-2 (no download).
"""
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from deltatune import LoraConfig, PeftModel, get_peft_model


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


model = get_peft_model(tiny_gpt2(), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], lora_bias=True))
model.print_trainable_parameters()
data = torch.randint(0, 256, (8, 32))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(5):
    loss = model(input_ids=data, labels=data).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")
model.eval()

with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), folder).eval()
    with torch.no_grad():
        before = loaded(data).logits
        merged = loaded.merge_and_unload()  # W + s·BA, and the lora_B bias added to the base bias
        after = merged(data).logits
print(f"reloaded then merged: max |logit difference| = {(after - before).abs().max().item():.2e}")
