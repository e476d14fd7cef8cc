"""Prompt and prefix tuning on an encoder-decoder model (T5), with peft's ``PeftModelForSeq2SeqLM`` semantics.

peft is the oracle: adapters saved by either library load in the other to the same logits and loss,
and greedy generation gives the same tokens. deltatune has no P-tuning, so there is none to test here.
"""
import peft
import pytest
import torch

from deltatune import PeftModel, PeftModelForSeq2SeqLM, get_peft_model
from deltatune.methods.prefix import PrefixTuningConfig, decoder_prefix
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.prompt_common import cache_argument
from test_prompt_common import perturb_trainable
from tiny import input_ids, tiny_gpt2, tiny_t5
from tolerances import assert_close

OURS = {"prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}
THEIRS = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}
CASES = [("prompt", {}), ("prefix", {}), ("prefix", dict(prefix_projection=True))]
CASE_IDS = ["prompt", "prefix", "prefix-projection"]

X = input_ids(batch=2, seq=7)
MASK = torch.ones_like(X)
MASK[1, :2] = 0  # left padding on one row: the mask must line up with the virtual tokens
LABELS = input_ids(batch=2, seq=5, seed=2)
DECODER_IDS = torch.cat([torch.zeros(2, 1, dtype=torch.long), LABELS[:, :-1]], dim=1)  # T5's shift_right


def _config(kind, **kw):
    return OURS[kind](task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **kw)


def _outputs(model):
    """(logits, loss) from labels, and logits from explicit decoder inputs with a decoder mask."""
    with torch.no_grad():
        out = model(input_ids=X, attention_mask=MASK, labels=LABELS)
        dec = model(input_ids=X, attention_mask=MASK, decoder_input_ids=DECODER_IDS,
                    decoder_attention_mask=torch.ones_like(DECODER_IDS)).logits
    return out.logits, out.loss, dec


def _assert_same(actual, expected, scale=1.0):
    for a, e in zip(_outputs(actual), _outputs(expected)):
        assert_close(a, e, scale=scale)


def _greedy_by_full_forwards(model, steps=4):
    """Decoder tokens by repeated full forwards: no cache, no generate."""
    dec = torch.zeros(X.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=X, attention_mask=MASK, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], dim=1)
    return dec


# ---- closed form ------------------------------------------------------------------------------------------
def test_decoder_prefix_follows_peft_layout():
    # peft doubles the per-layer blocks, regroups them four per decoder layer (self k, v, cross k, v) and
    # drops the cross part: decoder layer i keeps block 2i mod L.
    blocks = [(torch.tensor(float(i)), torch.tensor(-float(i))) for i in range(4)]
    assert [int(k) for k, _ in decoder_prefix(blocks)] == [0, 2, 0, 2]
    assert [int(k) for k, _ in decoder_prefix(blocks[:3])] == [0, 2, 1]
    assert all(k == -v for k, v in decoder_prefix(blocks))  # keys and values stay paired


@pytest.mark.parametrize("kind", OURS)
def test_defaults_and_table_shapes_match_peft(kind):
    ours = get_peft_model(tiny_t5(), _config(kind))
    theirs = peft.get_peft_model(tiny_t5(), THEIRS[kind](task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    assert isinstance(ours, PeftModelForSeq2SeqLM)
    fields = ("num_transformer_submodules", "token_dim", "num_layers", "num_attention_heads")
    assert [getattr(ours.peft_config["default"], f) for f in fields] == [getattr(theirs.peft_config["default"], f) for f in fields]
    assert ours.peft_config["default"].num_transformer_submodules == 2
    table = ours.get_adapter_state_dict("default")["prompt_embeddings"]
    assert table.shape == {"prompt": (3 * 2, 32), "prefix": (3, 2 * 2 * 32)}[kind]  # prompt: a block per stack
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---- peft parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_peft_parity_both_directions(kind, kw, tmp_path):
    ours = get_peft_model(tiny_t5(), _config(kind, **kw))
    perturb_trainable(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs_loaded = peft.PeftModel.from_pretrained(tiny_t5(), str(tmp_path / "ours")).eval()
    assert isinstance(theirs_loaded, peft.PeftModelForSeq2SeqLM)
    _assert_same(ours, theirs_loaded)
    base_logits = tiny_t5()(input_ids=X, attention_mask=MASK, labels=LABELS).logits
    assert (_outputs(ours)[0] - base_logits).abs().max() > 1e-2, "the adapter should change the output"

    theirs = peft.get_peft_model(tiny_t5(), THEIRS[kind](task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **kw))
    perturb_trainable(theirs, seed=1)
    theirs.eval().save_pretrained(str(tmp_path / "theirs"))
    ours_loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path / "theirs")
    assert isinstance(ours_loaded, PeftModelForSeq2SeqLM)
    # peft's live model with prefix_projection runs the MLP per batch row; the saved table rounds
    # differently in the last bit, hence one step above exact (as in test_prompt_common.peft_round_trip).
    _assert_same(ours_loaded, theirs, scale=2.0)


def test_prefix_width_follows_d_kv_where_peft_would_use_d_model(tmp_path):
    # 4 heads of d_kv=4 (keys 16 wide) on d_model=32: peft's default token_dim=32 cannot be viewed as
    # this model's keys; deltatune fills 16, and the saved config lets peft load it.
    make = lambda: tiny_t5(d_kv=4)  # noqa: E731
    ours = get_peft_model(make(), _config("prefix"))
    assert ours.peft_config["default"].token_dim == 16
    perturb_trainable(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    _assert_same(ours, peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval())


# ---- generate -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", OURS)
def test_generate_gives_peft_tokens(kind, tmp_path):
    ours = get_peft_model(tiny_t5(), _config(kind))
    perturb_trainable(ours, scale=10.0)  # large enough that the random model's greedy tokens change
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), str(tmp_path / "ours")).eval()
    greedy = dict(input_ids=X, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        cached, uncached = ours.generate(**greedy), ours.generate(**greedy, use_cache=False)
        base = tiny_t5().generate(**greedy)
        reference = _greedy_by_full_forwards(theirs)
        if kind == "prompt":
            assert torch.equal(theirs.generate(**greedy), reference)
        # peft 0.21.2's prefix generate passes past_key_values next to the cache= that transformers 5.25's
        # generate passes, and the model keeps cache=: the prefix is lost. peft's forward is its semantics.
    assert torch.equal(cached, reference) and torch.equal(uncached, reference)
    assert not torch.equal(cached, base), "the adapter should change the generated tokens"


@pytest.mark.parametrize("kind", OURS)
def test_manual_decoding_with_the_returned_cache_matches_a_full_forward(kind):
    pm = get_peft_model(tiny_t5(), _config(kind))
    perturb_trainable(pm)
    pm.eval()
    with torch.no_grad():
        full = pm(input_ids=X, attention_mask=MASK, decoder_input_ids=DECODER_IDS).logits[:, -1]
        first = pm(input_ids=X, attention_mask=MASK, decoder_input_ids=DECODER_IDS[:, :-1], use_cache=True)
        # a decoding step: the encoder's outputs already hold the prompt, the cache already the prefix
        # the cache's name is transformers' (``cache`` from 5.25 on, ``past_key_values`` before)
        name = cache_argument(pm.get_base_model())
        step = pm(input_ids=X, attention_mask=MASK, encoder_outputs=(first.encoder_last_hidden_state,),
                  decoder_input_ids=DECODER_IDS[:, -1:], use_cache=True, **{name: getattr(first, name)}).logits[:, -1]
    assert_close(step, full, tier="reordered")  # cached attention sums in another order


# ---- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", OURS)
def test_training_moves_only_the_read_part_of_the_table(kind):
    pm = get_peft_model(tiny_t5(), _config(kind))
    frozen = {n: p.detach().clone() for n, p in pm.base_model.model.named_parameters()}
    assert [n for n, p in pm.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    table = pm.prompt_encoder["default"].embedding.weight
    start = table.detach().clone()
    opt = torch.optim.Adam([table], lr=5e-2)  # no weight decay: rows without gradient must not move
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=X, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for n, p in pm.base_model.model.named_parameters():
        assert torch.equal(p, frozen[n]), f"frozen base parameter {n} changed"
    moved = (table.detach() != start).any(dim=0 if kind == "prefix" else 1)
    if kind == "prompt":  # rows: the encoder's block trains, peft's decoder block is never read
        assert moved[:3].all() and not moved[3:].any()
    else:  # columns: 2 layers -> both decoder layers read block 0 (2i mod 2), block 1 is never read
        width = 2 * 32
        assert moved[:width].all() and not moved[width:].any()


# ---- what is refused, and why -------------------------------------------------------------------------------
def test_task_type_must_match_the_architecture():
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        get_peft_model(tiny_gpt2(), _config("prompt"))
    with pytest.raises(ValueError, match="is an encoder-decoder model but task_type='CAUSAL_LM'"):
        get_peft_model(tiny_t5(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="num_transformer_submodules=2 with task_type='CAUSAL_LM'"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_transformer_submodules=2)


def test_prefix_combinations_that_cannot_work_are_refused():
    # peft builds a plain DynamicCache here, which T5's cross-attention then appends the encoder's keys to
    with pytest.raises(ValueError, match="needs 2 .or None.; with 1 the decoder's cross-attention"):
        get_peft_model(tiny_t5(), _config("prefix", num_transformer_submodules=1))
    # peft's cache has num_layers (encoder) entries and fails with an IndexError in the third decoder layer
    with pytest.raises(ValueError, match="the decoder has 3 layers.*pass num_layers=3"):
        get_peft_model(tiny_t5(num_decoder_layers=3), _config("prefix"))
    with pytest.raises(ValueError, match=r"pass token_dim=16"):
        get_peft_model(tiny_t5(d_kv=4), _config("prefix", token_dim=32))


def test_prompt_generate_refuses_encoder_outputs():
    pm = get_peft_model(tiny_t5(), _config("prompt")).eval()
    encoded = pm.get_base_model().get_encoder()(input_ids=X)
    with pytest.raises(ValueError, match="instead of encoder_outputs"):
        pm.generate(input_ids=X, encoder_outputs=encoded, max_new_tokens=2)
