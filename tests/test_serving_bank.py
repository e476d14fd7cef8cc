"""Adapter banks: the per-row formula on hand-sized tensors, slot growth, and LRU bookkeeping."""
import pytest
import torch
from torch import nn

from deltatune.serving.bank import AdapterBank, LayerBank
from deltatune.serving.routing import routed
from deltatune.serving.slots import SlotWeights
from tolerances import assert_close

OUT, IN = 5, 4


def _weights(kind: str, seed: int) -> SlotWeights:
    g = torch.Generator().manual_seed(seed)
    r = {"lora": 2, "dora": 3, "ia3_in": 0, "ia3_out": 0}[kind]
    w = SlotWeights(OUT, IN)
    if r:
        w.A, w.B, w.scaling = torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), 0.5 + seed
    if kind == "dora":
        w.out_scale = torch.rand(OUT, generator=g) + 0.5
        w.out_shift = torch.randn(OUT, generator=g)
    if kind == "ia3_in":
        w.in_scale = torch.rand(IN, generator=g) + 0.5
    if kind == "ia3_out":
        w.out_scale = torch.rand(OUT, generator=g) + 0.5
    return w


def _by_hand(layer: nn.Linear, x: torch.Tensor, w: SlotWeights | None) -> torch.Tensor:
    """y = (W (x ⊙ g) + b + s (x Aᵀ) Bᵀ) ⊙ o + t, written out for one row."""
    if w is None:
        return layer(x)
    g = w.in_scale if w.in_scale is not None else torch.ones(IN)
    y = (x * g) @ layer.weight.T + layer.bias
    if w.A is not None:
        y = y + w.scaling * (x @ w.A.T) @ w.B.T
    if w.out_scale is not None:
        y = y * w.out_scale
    return y + (w.out_shift if w.out_shift is not None else 0)


class _Source:
    def __init__(self, weights):
        self.weights, self.reads, self.version = weights, 0, 0

    def read(self):
        self.reads += 1
        return {"lin": self.weights}

    def signature(self):
        return self.version


@torch.no_grad()
def test_per_row_formula_closed_form():
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT)
    kinds = ["lora", "dora", "ia3_in", "ia3_out"]
    bank = AdapterBank(max_slots=4)
    for i, kind in enumerate(kinds):
        bank.register(kind, _Source(_weights(kind, i)))
    names = ["ia3_out", "__base__", "lora", "dora", "ia3_in", "lora"]
    x = torch.randn(len(names), 3, IN)  # (b, L, in)
    with bank.request(names) as (ids, unique), routed(bank, ids, unique, lambda path: layer):
        y = layer(x)
    for i, name in enumerate(names):
        w = None if name == "__base__" else _weights(name, kinds.index(name))
        assert_close(y[i], _by_hand(layer, x[i], w))
    for name in kinds:  # one adapter for every row takes the 2-D path
        with bank.request([name, name]) as (ids, unique), routed(bank, ids, unique, lambda path: layer):
            assert_close(layer(x[:2]), _by_hand(layer, x[:2], _weights(name, kinds.index(name))))
    assert torch.equal(layer(x), _by_hand(layer, x, None))  # no hooks are left behind


@torch.no_grad()
def test_consecutive_slots_are_served_from_views_of_the_bank():
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT)
    bank = AdapterBank(max_slots=3)
    for i in range(3):
        bank.register(f"a{i}", _Source(_weights("lora", i)))
    bank.ensure(["a0", "a1", "a2"])  # slots 1, 2, 3
    x = torch.randn(3, 2, IN)
    for names in (["a0", "a1", "a2"], ["a2", "a0", "a1"]):
        with bank.request(names) as (ids, unique):
            plan = bank.layers["lin"].plan(ids, unique)
            with routed(bank, ids, unique, lambda path: layer):
                y = layer(x)
        shares = plan.A.untyped_storage().data_ptr() == bank.layers["lin"].A.untyped_storage().data_ptr()
        assert shares == (names == ["a0", "a1", "a2"])  # slots 1, 2, 3 in order: no copy; otherwise gathered
        for i, name in enumerate(names):
            assert_close(y[i], _by_hand(layer, x[i], _weights("lora", int(name[1]))))


@torch.no_grad()
def test_growing_rank_and_slots_keeps_what_is_there():
    layer = LayerBank(OUT, IN, embedding=False, dtype=torch.float32, device="cpu")
    small, big = _weights("lora", 1), _weights("dora", 2)
    g = torch.Generator().manual_seed(3)
    big.A, big.B = torch.randn(10, IN, generator=g), torch.randn(OUT, 10, generator=g)  # rank 10
    layer.write(1, small, limit=9)
    assert layer.r == 8  # ranks are padded to the CPU kernel's 8-column block
    layer.write(5, big, limit=9)  # more slots and a larger rank: slot 1 must survive the reallocation
    assert layer.capacity >= 6 and layer.r == 16
    assert torch.equal(layer.A[1, :2], small.A) and not layer.A[1, 2:].any()
    assert torch.equal(layer.A[5, :10], big.A) and torch.equal(layer.Bt[5, :10], (big.B * big.scaling).T)
    assert torch.equal(layer.vectors["out_scale"][1], torch.ones(OUT))  # slot 1 has no DoRA scale
    layer.clear(5)
    assert not layer.A[5].any() and torch.equal(layer.vectors["out_scale"][5], torch.ones(OUT))
    assert layer.occupied == {1}


def test_lru_order_pins_reload_and_staleness():
    sources = {n: _Source(_weights("lora", i)) for i, n in enumerate("abc")}
    bank = AdapterBank(max_slots=2)
    for n, s in sources.items():
        bank.register(n, s)
    bank.ensure(["a"])
    bank.ensure(["b"])
    bank.ensure(["a"])  # touch a: b is now least recently used
    bank.ensure(["c"])
    assert bank.resident == ["a", "c"]
    with bank.request(["a", "c"]):
        with pytest.raises(RuntimeError, match="serving a request"):
            bank.evict("c")
        with pytest.raises(RuntimeError, match="in use by running requests"):
            bank.ensure(["b"])
    bank.ensure(["b"])  # a is least recent now, and no longer pinned
    assert bank.resident == ["c", "b"] and sources["b"].reads == 2  # read again after its eviction
    sources["c"].version += 1  # the weights behind "c" changed: the next request re-reads them
    bank.ensure(["c"])
    assert sources["c"].reads == 2
    with pytest.raises(ValueError, match="max_slots=2"):
        bank.ensure(["a", "b", "c"])
    with pytest.raises(ValueError, match="reserved"):
        bank.register("__base__", sources["a"])
    with pytest.raises(ValueError, match="positive int"):
        AdapterBank(max_slots=0)


def test_evicted_slot_is_cleared_for_the_next_adapter():
    bank = AdapterBank(max_slots=1)
    bank.register("x", _Source(_weights("dora", 3)))
    other = _Source(_weights("lora", 4))
    other.read = lambda: {"other": _weights("lora", 4)}  # targets a different layer
    bank.register("y", other)
    bank.ensure(["x"])
    bank.ensure(["y"])  # reuses slot 1: the old layer must not keep x's factors in it
    assert bank.layers["lin"].occupied == set()
    assert not bank.layers["lin"].A[1].any()
