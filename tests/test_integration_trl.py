"""A deltatune PeftModel trains in TRL's ``SFTTrainer`` (TRL is optional: skipped when not installed).

TRL recognises only peft's own ``PeftModel`` (``accelerate.utils.is_peft_model``); anything else is
treated as a plain transformers model whose ``forward`` it patches with a fused LM head that reads
``model.base_model`` as the transformer trunk. A deltatune ``PeftModel``'s ``base_model`` is the
adapter holder, so pass ``peft_model.get_base_model()``: the transformers model with the adapters
inside, where only adapter parameters are trainable. Save with ``peft_model.save_pretrained``.
"""
import pytest
import torch

import deltatune as dt
from test_data_support import chat_rows, tiny_tokenizer

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_trainer_trains_only_the_adapter_and_the_result_reloads(tmp_path, bf16):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    peft_model = dt.get_peft_model(LlamaForCausalLM(cfg), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        max_length=64, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        bf16=bf16,  # SFTConfig's default is bf16 autocast; under autocast LoRA takes its generic path
    )
    data = datasets.Dataset.from_list([{"messages": r["messages"]} for r in chat_rows(8)])
    trainer = trl.SFTTrainer(model=peft_model.get_base_model(), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert changed == trainable and len(trainable) == 8  # lora_A/B of q/v in 2 layers; the base is untouched

    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("What is 2 plus 2?")["input_ids"]])
    torch.manual_seed(0)
    reloaded = dt.PeftModel.from_pretrained(LlamaForCausalLM(cfg), tmp_path / "adapter")
    trained = dict(peft_model.named_parameters())
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name]), name
    if bf16:
        return  # accelerate leaves the trained model's forward wrapped in bf16 autocast: logits differ by design
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model.eval()(ids).logits)
