"""AdaLoRA against the real peft: checkpoints (with pruned ranks) load both ways with the same logits,
parameter counts match, and the same training loop gives the same losses and rank masks."""
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.adalora import AdaLoraConfig
from test_adalora_lifecycle import CASES, load_quietly
from tiny import input_ids, tiny_llama
from tolerances import assert_close


def _configs(kind, **kw):
    kw = {**dict(init_r=4, target_r=2, total_step=4, init_lora_weights=False), **CASES[kind][1], **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice
        return AdaLoraConfig(**kw), peft.AdaLoraConfig(**kw)


def _labels(kind, x):
    return torch.tensor([0, 2]) if kind == "bert" else x


def run(model, steps, x, labels, lr=0.1):
    """The loop peft documents; the same code drives both libraries."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, patterns = [], []
    model.train()
    for step in range(steps):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        pattern = model.peft_config["default"].rank_pattern or {}
        losses.append(loss.item())
        patterns.append({k.removesuffix(".default"): [bool(b) for b in v] for k, v in pattern.items()})
    model.eval()
    return losses, patterns


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_trainable_counts_match_at_init(kind):
    make = CASES[kind][0]
    ours, theirs = _configs(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.get_peft_model(make(), theirs).get_nb_trainable_parameters()
    assert dt.get_peft_model(make(), ours).get_nb_trainable_parameters() == expected


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_pruned_checkpoint_ours_to_peft(kind, tmp_path):
    make = CASES[kind][0]
    x = input_ids()
    model = dt.get_peft_model(make(), _configs(kind)[0])
    run(model, 3, x, _labels(kind, x))
    assert model.peft_config["default"].rank_pattern is not None
    logits = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert_close(theirs(input_ids=x).logits, logits)
    assert theirs.get_nb_trainable_parameters()[1] == load_quietly(make, tmp_path).get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_pruned_checkpoint_peft_to_ours(kind, tmp_path):
    make = CASES[kind][0]
    x = input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), _configs(kind)[1])
        run(theirs, 3, x, _labels(kind, x))
        logits = theirs(input_ids=x).logits
        theirs.save_pretrained(tmp_path)
    ours = load_quietly(make, tmp_path)
    assert_close(ours(input_ids=x).logits, logits)
    ranks = {k: sum(v) for k, v in ours.peft_config["default"].rank_pattern.items()}
    assert 0 < sum(ranks.values()) < 4 * len(ranks)


def test_same_loop_gives_the_same_losses_and_masks(tmp_path):
    """From identical weights, peft and deltatune take identical steps: same loss (with the orthogonal
    regulariser), same sensitivity scores, hence the same rank masks at every step."""
    x = input_ids()
    ours_cfg, theirs_cfg = _configs("llama", total_step=6, tinit=1, tfinal=1, init_lora_weights=True)
    theirs = peft.get_peft_model(tiny_llama(), theirs_cfg)
    theirs.save_pretrained(tmp_path)  # no rank_pattern yet: full-rank init weights
    ours = load_quietly(tiny_llama, tmp_path, is_trainable=True)
    assert ours.peft_config["default"].tfinal == 1
    their_losses, their_masks = run(theirs, 6, x, x, lr=0.5)
    our_losses, our_masks = run(ours, 6, x, x, lr=0.5)
    assert our_losses == pytest.approx(their_losses, abs=1e-5)
    assert our_masks == their_masks
    # b0 = 16, bT = 8: int(8 · (1 − (t − 1)/4)³ + 8) for t = 2..4, then the final mask at t = 5
    assert [sum(map(sum, m.values())) for m in our_masks] == [0, 0, 11, 9, 8, 8]
