"""adapter_names requests from several threads on one PeftModel: every row right, nothing left disabled."""
import threading

import pytest
import torch

import deltatune as dt
from tiny import VOCAB, input_ids, tiny_llama
from tolerances import assert_close


def _model():
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"), "a")
    pm.add_adapter("b", dt.LoraConfig(r=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.set_adapter("a")
    return pm.eval()


def _expected(pm, x, names):
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    rows.append(pm(input_ids=x[i : i + 1]).logits)
            else:
                pm.set_adapter(name)
                rows.append(pm(input_ids=x[i : i + 1]).logits)
    pm.set_adapter("a")
    return torch.cat(rows)


def test_concurrent_requests_get_their_own_rows_and_leave_the_model_as_it_was():
    pm = _model()
    x = input_ids(batch=4, seq=12)
    orders = [["a", "b", "__base__", "a"], ["b", "__base__", "a", "b"], ["__base__", "a", "b", "b"]]
    expected = [_expected(pm, x, names) for names in orders]
    with torch.no_grad():
        plain = pm(input_ids=x).logits
    errors, wrong = [], []

    def worker(k):
        try:
            for _ in range(20):
                with torch.no_grad():
                    out = pm(input_ids=x, adapter_names=orders[k]).logits
                if not torch.allclose(out, expected[k], atol=1e-5, rtol=1e-5):
                    wrong.append((k, (out - expected[k]).abs().max().item()))
                with torch.no_grad():  # a plain call in between must see the active adapter, not a disabled one
                    if not torch.allclose(pm(input_ids=x).logits, plain, atol=1e-5, rtol=1e-5):
                        wrong.append((k, "plain"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:3]}"
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=x).logits, plain, atol=1e-5, rtol=1e-5)
    assert pm.active_adapter == "a"


def test_a_request_that_raises_leaves_no_layer_disabled():
    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        plain = pm(input_ids=x).logits
        with pytest.raises(IndexError):
            pm(input_ids=torch.full_like(x, VOCAB + 5), adapter_names=["a", "b"])  # out of the vocabulary
        assert torch.allclose(pm(input_ids=x).logits, plain, atol=1e-6)
        assert torch.allclose(pm(input_ids=x, adapter_names=["b", "a"]).logits[1], plain[1], atol=1e-5)


def test_a_model_that_served_requests_still_deep_copies():
    import copy

    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        out = pm(input_ids=x, adapter_names=["a", "b"]).logits
        twin = copy.deepcopy(pm)
        assert torch.allclose(twin(input_ids=x, adapter_names=["a", "b"]).logits, out, atol=1e-6)


def _adapter_a(pm) -> dict[str, torch.nn.Parameter]:
    """Adapter "a"'s parameters by their names in ``pm``, found by layer type."""
    from deltatune.surgery.layer import AdaptedLayer

    return {
        f"{path}.adapters.a.{name}": p
        for path, m in pm.named_modules()
        if isinstance(m, AdaptedLayer) and "a" in m.adapters
        for name, p in m.adapters["a"].named_parameters()
    }


def _write(pm, how, new, tmp_path):
    """Put ``new`` ({parameter name: tensor}) into ``pm`` the way ``how`` says."""
    import copy

    params = _adapter_a(pm)
    if how == "load_state_dict":
        pm.load_state_dict(new, strict=False)
    elif how == "load_state_dict_assign":  # new Parameter objects take the old ones' places
        pm.load_state_dict({k: v.clone() for k, v in new.items()}, strict=False, assign=True)
    elif how == "set_peft_model_state_dict":
        sd = dt.get_peft_model_state_dict(pm, adapter_name="a")
        dt.set_peft_model_state_dict(pm, {k: v * 3.0 for k, v in sd.items()}, "a")  # peft's keys; 3x, as ``new``
    elif how == "load_adapter":
        twin = copy.deepcopy(pm)
        _write(twin, "no_grad_copy_", new, tmp_path)
        twin.save_pretrained(tmp_path, selected_adapters=["a"])
        pm.load_adapter(tmp_path / "a", "a")  # "a" exists: its weights are replaced
    elif how == "optimizer_step":
        for k, p in params.items():
            p.grad = p.detach() - new[k]  # SGD with lr=1: p - (p - new)
        torch.optim.SGD(params.values(), lr=1.0).step()
    else:
        for k, p in params.items():
            if how == "no_grad_copy_":
                with torch.no_grad():
                    p.copy_(new[k])
            elif how == "data.copy_":  # .data has a version counter of its own: p's does not move
                p.data.copy_(new[k])
            elif how == "data[...]=":
                p.data[...] = new[k]
            elif how == "data=":  # new storage
                p.data = new[k].clone()


WRITES = ["no_grad_copy_", "data.copy_", "data[...]=", "data=", "load_state_dict", "load_state_dict_assign",
          "set_peft_model_state_dict", "load_adapter", "optimizer_step"]


@pytest.mark.parametrize("how", WRITES)
def test_every_write_to_adapter_weights_reaches_the_next_request(how, tmp_path):
    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        pm(input_ids=x, adapter_names=["a", "b"])  # "a" is now cached in the bank
        before = pm(input_ids=x).logits
        _write(pm, how, {k: p.detach() * 3.0 for k, p in _adapter_a(pm).items()}, tmp_path)
        after = pm(input_ids=x).logits  # set_adapter's result ("a" is active)
        assert (after - before).abs().max() > 0.1, f"{how} did not change the weights: the test would prove nothing"
        # tripled factors: 9x the low-rank term, so the two summation orders differ by ~2e-5
        assert_close(pm(input_ids=x, adapter_names=["a", "a"]).logits, after, tier="reordered")
        assert_close(pm(input_ids=x, adapter_names=["b", "a"]).logits[1], after[1], tier="reordered")


def test_an_unchanged_adapter_is_not_read_again_even_with_nans():
    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        next(iter(_adapter_a(pm).values()))[0, 0] = float("nan")  # NaN != NaN: compared bit for bit instead
        pm(input_ids=x, adapter_names=["a", "b"])
        bank = pm.mixed_batches.bank
        loads = bank.loads
        for _ in range(3):
            pm(input_ids=x, adapter_names=["b", "a"])
    assert bank.loads == loads


def test_refresh_bank_drops_the_cached_copies():
    from deltatune.serving import refresh_bank

    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        out = pm(input_ids=x, adapter_names=["a", "b"]).logits
        refresh_bank(pm)
        assert pm.mixed_batches.bank.resident == []
        assert_close(pm(input_ids=x, adapter_names=["a", "b"]).logits, out)
