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


def _edit_a(pm, how):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".adapters.a." in name:
                if how == "data":
                    p.data.mul_(3.0)  # bypasses the version counter
                else:
                    p.mul_(3.0)


@pytest.mark.parametrize("how", ["in_place", "state_dict"])
def test_weights_changed_through_pytorch_are_picked_up_by_the_next_request(how):
    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        pm(input_ids=x, adapter_names=["a", "b"])  # "a" is now cached in the bank
        if how == "in_place":
            _edit_a(pm, "in_place")
        else:
            sd = dt.get_peft_model_state_dict(pm, adapter_name="a")
            dt.set_peft_model_state_dict(pm, {k: v * 3.0 for k, v in sd.items()}, "a")
        # tripled factors: 9x the low-rank term, so the two summation orders differ by ~2e-5
        assert_close(pm(input_ids=x, adapter_names=["a", "a"]).logits, pm(input_ids=x).logits, scale=10.0)


def test_weights_written_through_data_need_refresh_bank():
    from deltatune.serving import refresh_bank

    pm = _model()
    x = input_ids(batch=2, seq=6)
    with torch.no_grad():
        pm(input_ids=x, adapter_names=["a", "b"])
        _edit_a(pm, "data")
        stale = pm(input_ids=x, adapter_names=["a", "a"]).logits
        assert not torch.allclose(stale, pm(input_ids=x).logits, atol=1e-3), "documented: .data writes are not seen"
        refresh_bank(pm)
        assert_close(pm(input_ids=x, adapter_names=["a", "a"]).logits, pm(input_ids=x).logits, scale=10.0)
