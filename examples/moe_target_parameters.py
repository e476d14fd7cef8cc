"""LoRA on the experts of a mixture-of-experts model (``target_parameters``), in peft's format.

transformers 5 keeps a Mixtral/Qwen3-MoE/gpt-oss layer's experts as one 3-D parameter per projection
(``mlp.experts.gate_up_proj``: experts x out x in), not as nn.Linear layers, so they are adapted by
parameter name: one low-rank update per expert. Runs in seconds on a small random Mixtral (no download).
"""
import copy
import tempfile

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from deltatune import LoraConfig, PeftModel, get_peft_model

torch.manual_seed(0)
base = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2))
pristine = copy.deepcopy(base)  # get_peft_model wraps `base` in place; keep an untouched copy to reload onto
config = LoraConfig(
    r=8, lora_alpha=16,
    target_modules=["q_proj", "v_proj"],  # the attention's linear layers, as usual
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],  # every expert of every block
    task_type="CAUSAL_LM",
)
model = get_peft_model(base, config)
model.print_trainable_parameters()

data = torch.randint(0, 256, (8, 32))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(10):
    loss = model(input_ids=data, labels=data).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 3 == 0 or step == 9:
        print(f"step {step:2d}  loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    expected = model(input_ids=data).logits
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)  # peft's keys: ...mlp.experts.lora_A.weight, ...mlp.experts.base_layer.lora_A.weight
    reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), folder).eval()
    with torch.no_grad():
        print("reloaded == trained:", torch.allclose(reloaded(input_ids=data).logits, expected, atol=1e-5))
merged = reloaded.merge_and_unload()  # s·B_e·A_e added into each expert's slice of the 3-D parameter
with torch.no_grad():
    print("merged   == trained:", torch.allclose(merged(input_ids=data).logits, expected, atol=1e-4))
