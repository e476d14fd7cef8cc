"""causal_lm_loss against the model's own ``model(input_ids, labels=labels).loss``, gradients included.

Tier (c): parity with transformers on tiny LLaMA (untied head) and GPT-2 (head tied to the
embeddings), bare and under a real peft LoRA wrapper; plus the fallbacks to the standard path.
"""
import warnings

import pytest
import torch

from deltatune.train.loss import causal_lm_loss
from tiny import VOCAB, input_ids, tiny_gpt2, tiny_llama
from tolerances import assert_close


def _tiny_phi():
    """Phi's lm_head has a bias, which the fused loss must carry."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    return PhiForCausalLM(cfg).eval()


def _batch(seed=1):
    ids = input_ids(batch=2, seq=10, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a masked prompt, as in chat data
    return ids, mask, labels


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert_close(g, w)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, _tiny_phi])
def test_matches_model_loss_and_gradients(make):
    model = make()
    ids, mask, labels = _batch()
    want = model(ids, attention_mask=mask, labels=labels).loss
    got, n = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)
    assert n == int((labels[:, 1:] != -100).sum())
    assert_close(got, want)
    _assert_grads_close(_param_grads(model, got), _param_grads(model, want))


def test_bf16_model_matches_within_bf16_tolerance():
    model = tiny_llama().to(torch.bfloat16)
    ids, mask, labels = _batch()
    want = model(ids, attention_mask=mask, labels=labels).loss
    got, _ = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)
    assert_close(got, want, dtype=torch.bfloat16)
    for g, w in zip(_param_grads(model, got), _param_grads(model, want)):
        assert g.dtype == torch.bfloat16
        assert_close(g.float(), w.float(), dtype=torch.bfloat16)


def test_num_items_in_batch_matches_transformers_normalisation():
    model = tiny_llama()
    ids, mask, labels = _batch()
    want = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(23)).loss
    got, _ = causal_lm_loss(model, ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(23))
    assert_close(got, want)


def test_default_labels_are_input_ids_without_padding():
    model = tiny_llama()
    ids, mask, _ = _batch()
    want = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert_close(causal_lm_loss(model, ids, attention_mask=mask)[0], want)


def test_shift_labels_are_used_as_given():
    model = tiny_llama()
    ids, mask, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)[0]
    assert_close(causal_lm_loss(model, ids, attention_mask=mask, shift_labels=shifted)[0], want)


def test_frozen_lm_head_like_lora():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    ids, mask, labels = _batch()
    got = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)[0]
    want = model(ids, attention_mask=mask, labels=labels).loss
    _assert_grads_close(_param_grads(model, got), _param_grads(model, want))


def test_all_ignored_gives_zero():
    model = tiny_llama()
    ids, mask, _ = _batch()
    loss, n = causal_lm_loss(model, ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert n == 0 and loss.item() == 0.0


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_under_peft_lora_wrapper(targets):
    """A LoRA on lm_head makes the head a peft layer, not nn.Linear: it is run on supervised rows."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated in v5
        model = peft.get_peft_model(tiny_llama(), cfg)
    ids, mask, labels = _batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got, _ = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)
    assert_close(got, want)
    _assert_grads_close(_param_grads(model, got), _param_grads(model, want))


def test_logit_softcapping_falls_back_to_the_model_loss(monkeypatch):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # llama ignores it, so the reference is unchanged
    ids, mask, labels = _batch()
    import deltatune.train.loss as loss_mod
    monkeypatch.setattr(loss_mod, "_warned_reasons", set())
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # only the standard path runs the full model
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        got, n = causal_lm_loss(model, ids, attention_mask=mask, labels=labels)
    assert calls and n == int((labels[:, 1:] != -100).sum())
    assert_close(got, model(ids, attention_mask=mask, labels=labels).loss)


def test_rejects_labels_outside_vocabulary():
    model = tiny_llama()
    ids, mask, labels = _batch()
    labels[0, -1] = VOCAB
    with pytest.raises(ValueError, match="labels must be in"):
        causal_lm_loss(model, ids, attention_mask=mask, labels=labels)


def test_wrapper_without_config_falls_back_to_its_forward(monkeypatch):
    """A DDP-like wrapper must be called through its forward, never bypassed to reach the trunk."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kw):
            return self.module(**kw)

    import deltatune.train.loss as loss_mod
    monkeypatch.setattr(loss_mod, "_warned_reasons", set())
    model = tiny_llama()
    ids, mask, labels = _batch()
    with pytest.warns(UserWarning, match="not a transformers model"):
        got, _ = causal_lm_loss(Wrapper(model), ids, attention_mask=mask, labels=labels)
    assert_close(got, model(ids, attention_mask=mask, labels=labels).loss)
