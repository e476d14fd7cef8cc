"""TRL's SFTTrainer and DPOTrainer train a deltatune model as they train a peft model (TRL is optional).

The code is what a TRL user writes, with peft's import swapped for deltatune's: the wrapped model
passed as ``model=``, or a config passed as ``peft_config=``. The oracle is the same code run with
peft from the same starting adapter: TRL's peft path (fused LM head on ``get_base_model()``, DPO's
reference pass through a frozen "ref" copy or ``disable_adapter()``) must give the same losses and
the same trained adapter. SFTConfig/DPOConfig default to bf16 autocast, which on a CPU needs
``use_cpu=True``; under bf16 the two libraries round differently, hence the tolerances below.
"""
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from support_data import chat_rows, tiny_tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


def _base(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """One adapter both libraries start from, with lora_B non-zero so the adapter changes the logits."""
    tok = tiny_tokenizer()
    torch.manual_seed(1)
    model = peft.get_peft_model(_base(tok), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("start")
    model.save_pretrained(folder)
    return folder


def _sft_data():
    import datasets

    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in chat_rows(8)])


def _dpo_data():
    import datasets

    rows = [("What is 2 plus 2?", " 4", " 5"), ("Name a colour.", " Blue", " Seven"), ("Say hi.", " Hi!", " No.")]
    return datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows * 3])


def _trainer(lib, kind, way, tok, out, start):
    """The user's code: ``lib`` is ``peft`` or ``deltatune``; ``way`` passes a wrapped model or a config."""
    base = _base(tok)
    config = lib.LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM")
    if way == "model":
        model, extra = lib.PeftModel.from_pretrained(base, start, is_trainable=True), {}
    else:
        model, extra = base, {"peft_config": config}
    if kind == "sft":
        args = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             max_length=64, logging_steps=1, use_cpu=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_sft_data(), processing_class=tok, **extra)
    else:
        args = trl.DPOConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             max_length=64, logging_steps=1, use_cpu=True)
        if way == "model":
            extra["ref_model"] = None  # TRL's documented peft usage: the reference is the adapter's frozen copy
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=_dpo_data(), processing_class=tok, **extra)
    if way == "config":
        # TRL built the adapter with the library's own random init; start both from the same weights
        trainer.model.load_adapter(start, adapter_name="default", is_trainable=True)
    return trainer


def _adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("way", ["model", "config"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trains_a_deltatune_adapter_as_it_trains_peft(kind, way, start, tmp_path):
    tok = tiny_tokenizer()
    runs = {}
    for lib in (peft, dt):
        out = tmp_path / lib.__name__
        trainer = _trainer(lib, kind, way, tok, out, start)
        assert trainer.model.__class__.__module__.startswith(lib.__name__)  # TRL kept the library's model
        trainer.train()
        trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        trainer.save_model(str(out / "final"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[lib.__name__] = losses, trainable, out
    (dt_losses, dt_trainable, dt_out), (pf_losses, pf_trainable, pf_out) = runs["deltatune"], runs["peft"]
    assert len(dt_trainable) == len(pf_trainable) == 8  # lora_A/B of q/v in 2 layers; no "ref" copy trains
    assert all("default" in n for n in dt_trainable)
    # bf16 autocast: the two libraries sum in different orders; 2% on a loss of ~0.7-6 is far below what a
    # wrong reference (DPO: rewards against the base model instead of the adapter copy) or a dead adapter gives
    torch.testing.assert_close(torch.tensor(dt_losses), torch.tensor(pf_losses), rtol=2e-2, atol=1e-3)
    assert not (dt_out / "final" / "model.safetensors").exists()
    ours, theirs, initial = _adapter(dt_out / "final"), _adapter(pf_out / "final"), _adapter(start)
    assert ours.keys() == theirs.keys() == initial.keys()
    for key in ours:
        moved_ours, moved_theirs = ours[key] - initial[key], theirs[key] - initial[key]
        assert moved_theirs.abs().max() > 0, key
        # Adam's steps are ~lr in size whatever the gradient, so bf16 rounding shows as sign flips on elements
        # whose gradient is near zero: compare the direction of the whole update
        cos = torch.nn.functional.cosine_similarity(moved_ours.flatten(), moved_theirs.flatten(), dim=0)
        assert cos > 0.95, (key, cos)
    checkpoint = dt_out / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    reloaded = dt.PeftModel.from_pretrained(_base(tok), dt_out / "final")
    assert reloaded.peft_config["default"].target_modules is not None


def test_trl_rejects_lm_head_adapter_for_a_deltatune_model_as_for_peft(tmp_path):
    # TRL computes log-probs from lm_head.weight directly, so it refuses an adapter there; ours is recognised too
    tok = tiny_tokenizer()
    model = dt.get_peft_model(_base(tok), dt.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, max_length=64, use_cpu=True)
    with pytest.raises(ValueError, match="lm_head"):
        trl.SFTTrainer(model=model, args=args, train_dataset=_sft_data(), processing_class=tok)
