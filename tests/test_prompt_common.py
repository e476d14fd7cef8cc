"""What prompt and prefix tuning share: input adjustment (closed form), configs, loading errors, mixing.

The helpers at the top (``Rows``, ``train_briefly``, ``greedy_reference``, ``peft_round_trip``) are
used by tests/test_prompt.py and tests/test_prefix.py too.
"""
import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments

from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model
from deltatune.methods.prefix import PrefixTuningConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.prompt_common import adjust_inputs, extend_attention_mask
from tiny import input_ids, tiny_bert_cls, tiny_gpt2, tiny_llama
from tolerances import assert_close

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert-cls": tiny_bert_cls}


# ---- helpers shared with test_prompt.py / test_prefix.py ----------------------------------------------
class Rows(torch.utils.data.Dataset):
    """Eight rows for causal LM (labels = inputs) or sequence classification (labels = class ids)."""

    def __init__(self, seq_cls: bool):
        ids = input_ids(batch=8, seq=10, seed=5)
        self.rows = [
            dict(input_ids=ids[i], attention_mask=torch.ones_like(ids[i]), labels=torch.tensor(i % 3) if seq_cls else ids[i])
            for i in range(8)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_briefly(model, tmp_path, seq_cls: bool) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Rows(seq_cls)).train()


def check_life_cycle(make, config, tmp_path):
    """get_peft_model -> Trainer -> only the prompt (and classifier copy) changed -> save/load gives
    the same output -> disable_adapter gives the base model -> greedy generate (causal LMs)."""
    seq_cls = config.task_type == TaskType.SEQ_CLS
    pm = get_peft_model(make(), config)
    x, mask = input_ids(), torch.ones_like(input_ids())
    before = pm(input_ids=x, attention_mask=mask).logits.detach()
    frozen = {n: p.detach().clone() for n, p in pm.base_model.model.named_parameters() if not p.requires_grad}
    train_briefly(pm, tmp_path, seq_cls)
    pm.eval()
    after = pm(input_ids=x, attention_mask=mask).logits.detach()
    assert (after - before).abs().max() > 1e-4, "three training steps should change the output"
    for n, p in pm.base_model.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen base parameter {n} changed"
    pm.save_pretrained(tmp_path / "saved")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "saved")
    assert_close(loaded(input_ids=x, attention_mask=mask).logits, after)
    with pm.disable_adapter():
        assert_close(pm(input_ids=x, attention_mask=mask).logits, make()(input_ids=x, attention_mask=mask).logits)
    if not seq_cls:
        out = loaded.generate(input_ids=x[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, x.shape[1] + 4) and torch.equal(out[0, : x.shape[1]], x[0])
    return pm


def perturb_trainable(model, seed: int = 0, scale: float = 0.5) -> None:
    """Move every trainable tensor away from its initial value, so a lost tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_round_trip(make, ours_config, theirs_config, tmp_path, mask=None):
    """ours -> peft and peft -> ours logits, and both trainable-parameter counts."""
    import peft

    x = input_ids()
    mask = torch.ones_like(x) if mask is None else mask
    ours = get_peft_model(make(), ours_config)
    perturb_trainable(ours)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs_loaded = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    assert_close(theirs_loaded(input_ids=x, attention_mask=mask).logits, ours(input_ids=x, attention_mask=mask).logits)

    theirs = peft.get_peft_model(make(), theirs_config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    perturb_trainable(theirs, seed=1)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_loaded = PeftModel.from_pretrained(make(), tmp_path / "theirs")
    # peft's live model with prefix_projection runs the MLP per batch row; the saved table rounds
    # differently in the last bit, hence one step above exact.
    assert_close(ours_loaded(input_ids=x, attention_mask=mask).logits, theirs(input_ids=x, attention_mask=mask).logits, scale=2.0)
    shutil.rmtree(tmp_path / "ours"), shutil.rmtree(tmp_path / "theirs")
    return ours, ours_loaded


def greedy_reference(model, x, mask, steps: int, positions: bool):
    """Greedy decoding by repeated full forwards (no cache): token ids and each step's last logits.

    ``positions``: pass padding-aware position ids as transformers' generate makes them (prefix
    tuning uses them; prompt tuning ignores them, as peft does).
    """
    ids, msk, logits = x, mask, []
    with torch.no_grad():
        for _ in range(steps):
            pos = (msk.cumsum(-1) - 1).clamp(min=0) if positions else None
            last = model(input_ids=ids, attention_mask=msk, position_ids=pos).logits[:, -1]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            ids, msk = torch.cat([ids, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    return ids, logits


def check_generate_matches_reference(pm, steps: int = 5, positions: bool = False):
    """generate with and without the KV cache == repeated full forwards, token ids and logits."""
    x = input_ids(batch=2, seq=6, seed=4)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding in row 1
    ref_ids, ref_logits = greedy_reference(pm, x, mask, steps, positions)
    for use_cache in (True, False):
        with torch.no_grad():
            out = pm.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=use_cache,
                pad_token_id=0, return_dict_in_generate=True, output_logits=True,
            )
        assert torch.equal(out.sequences, ref_ids), f"use_cache={use_cache}"
        for got, want in zip(out.logits, ref_logits):
            assert_close(got, want, tier="reordered")  # cached attention sums in another order: ~1e-6 apart


# ---- input adjustment, closed form ----------------------------------------------------------------------
def _kwargs():
    return dict(
        input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]]),
        labels=torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[0, 1, 2]]), token_type_ids=torch.tensor([[1, 1, 1]]),
    )


def test_extend_attention_mask_prepends_ones_and_keeps_dtype():
    m = extend_attention_mask(torch.tensor([[0, 1]], dtype=torch.long), 3)
    assert m.tolist() == [[1, 1, 1, 0, 1]] and m.dtype == torch.long
    with pytest.raises(ValueError, match="2-D"):
        extend_attention_mask(torch.ones(1, 1, 2, 2), 3)


def test_prompt_inputs_causal_lm():
    cfg = PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="position_ids"):
        out = adjust_inputs(cfg, _kwargs(), inserts_tokens=True, fresh=True)
    assert out["attention_mask"].tolist() == [[1, 1, 0, 1, 1]]
    assert out["labels"].tolist() == [[-100, -100, 5, 6, 7]]
    assert out["position_ids"] is None and out["token_type_ids"] is None


def test_prompt_inputs_seq_cls_keeps_token_types_and_labels():
    cfg = PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS")
    kw = _kwargs()
    kw.pop("position_ids")
    kw["labels"] = torch.tensor([2])
    out = adjust_inputs(cfg, kw, inserts_tokens=True, fresh=True)
    assert out["token_type_ids"].tolist() == [[0, 0, 1, 1, 1]]
    assert out["labels"].tolist() == [2]


def test_decoding_step_only_extends_the_mask():
    cfg = PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    kw = dict(input_ids=torch.tensor([[9]]), attention_mask=torch.tensor([[1, 1, 1, 1]]), labels=torch.tensor([[9]]))
    out = adjust_inputs(cfg, kw, inserts_tokens=True, fresh=False)
    assert out["attention_mask"].shape == (1, 6) and out["labels"].tolist() == [[9]]


def test_prefix_inputs_shift_positions_and_keep_labels():
    cfg = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    kw = _kwargs()
    kw.pop("token_type_ids")
    out = adjust_inputs(cfg, kw, inserts_tokens=False, fresh=True)
    assert out["position_ids"].tolist() == [[4, 5, 6]]  # the prefix holds positions 0..3
    assert out["labels"].tolist() == [[5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 1, 1]]


# ---- configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PromptTuningConfig, PrefixTuningConfig])
def test_config_errors_name_the_field(cls):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        cls()
    with pytest.raises(ValueError, match="num_transformer_submodules=2 with task_type='CAUSAL_LM'.*SEQ_2_SEQ_LM"):
        cls(num_virtual_tokens=4, task_type="CAUSAL_LM", num_transformer_submodules=2)  # encoder-decoder only
    with pytest.raises(ValueError, match="num_layers"):
        cls(num_virtual_tokens=4, num_layers=0)
    assert cls(num_virtual_tokens=4).is_prompt_learning


def test_dimensions_are_filled_from_the_model_and_saved():
    pm = get_peft_model(tiny_gpt2(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    cfg = pm.peft_config["default"]
    assert (cfg.num_layers, cfg.token_dim, cfg.num_attention_heads, cfg.num_transformer_submodules) == (2, 32, 4, 1)


# ---- mixing, loading errors ---------------------------------------------------------------------------------
def test_prompt_learning_does_not_mix_with_other_methods():
    pm = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="do not mix"):
        pm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="do not mix"):
        pm.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))


def test_loading_a_wrong_checkpoint_names_the_problem_and_loads_nothing():
    sd = get_peft_model(tiny_bert_cls(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")).get_adapter_state_dict("default")
    other = get_peft_model(tiny_bert_cls(), PromptTuningConfig(num_virtual_tokens=5, task_type="SEQ_CLS"))
    perturb_trainable(other)
    before = other.get_adapter_state_dict("default")
    sd.pop("base_model.classifier.bias")
    sd["base_model.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        other.load_adapter_state_dict(sd, "default")
    for expected in (r"missing: base_model.classifier.bias", "unexpected: base_model.extra",
                     "prompt_embeddings: checkpoint (3, 32) vs model (5, 32)", "nothing was loaded"):
        assert expected in str(err.value)
    for k, v in other.get_adapter_state_dict("default").items():
        assert torch.equal(v, before[k])
