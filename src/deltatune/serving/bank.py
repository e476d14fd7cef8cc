"""Stacked adapter banks: every served adapter in a slot of one tensor per layer, with LRU eviction.

A :class:`LayerBank` holds one layer's slots (A (S, r, in), scaled Bᵀ (S, r, out), and, only once an
adapter needs them, input scale (S, in), output scale (S, out), output shift (S, out)), zero-padded
to the largest rank seen (rounded up to a multiple of 8, the compiled CPU kernel's column block).
A is stored transposed, (S, in, r) in memory, and Bᵀ as is, (S, r, out): the layouts in which
:mod:`deltatune.serving.cpu_kernel` reads a row's factors with unit stride. Slot 0 is the base
model ("__base__"): zero factors, unit scales. An :class:`AdapterBank` maps adapter names to slots across layers, loads adapters from their
sources on demand and evicts the least recently used one when all ``max_slots`` are taken.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterator, Protocol, Sequence

import torch

from deltatune.serving import cpu_kernel
from deltatune.serving.kernels import gather_rows
from deltatune.serving.slots import SlotWeights

BASE = "__base__"
# field -> (fill value for an unused slot, which feature size it spans)
_VECTORS = {"in_scale": (1.0, "in"), "out_scale": (1.0, "out"), "out_shift": (0.0, "out")}


def _padded(rank: int) -> int:
    """``rank`` rounded up to the compiled CPU kernel's 8-column block."""
    return -(-rank // 8) * 8


class AdapterSource(Protocol):
    """Where an adapter's weights come from; read again whenever the adapter is (re)loaded."""

    def read(self) -> dict[str, SlotWeights]:
        """{module path: its weights in bank form}."""

    def signature(self) -> Hashable:
        """Changes whenever the weights change (a reload is then due)."""


@dataclass
class LayerPlan:
    """One request's per-row view of a layer bank, built once (generation reuses it every step)."""

    rows: int
    ids: torch.Tensor  # (b,) slot per row
    # (b, r, in) per row, or (r, in) when one slot serves every row; for an embedding with several
    # slots, the whole bank's A (S, r, vocab), looked up by ``ids``
    A: torch.Tensor | None = None
    Bt: torch.Tensor | None = None  # (b, r, out) scaled Bᵀ per row, or (r, out)
    in_scale: torch.Tensor | None = None  # (b, in) or (1, in)
    out_scale: torch.Tensor | None = None  # (b, out) or (1, out)
    out_shift: torch.Tensor | None = None  # (b, out) or (1, out)
    single: bool = False


class LayerBank:
    """All slots of one layer. Tensors grow on demand (more slots, larger rank) up to ``limit`` slots."""

    def __init__(self, out_features: int, in_features: int, embedding: bool, dtype: torch.dtype, device) -> None:
        self.out_features, self.in_features, self.embedding = out_features, in_features, embedding
        self.dtype, self.device = dtype, device
        self.capacity, self.r = 1, 0
        self.A = torch.zeros(1, in_features, 0, dtype=dtype, device=device).transpose(1, 2)  # (S, r, in), a view
        self.Bt = torch.zeros(1, 0, out_features, dtype=dtype, device=device)  # (S, r, out), times scaling
        self.vectors: dict[str, torch.Tensor] = {}  # in_scale (S, in), out_scale / out_shift (S, out)
        self.rank: dict[int, int] = {}  # slot -> its LoRA rank
        self.uses: dict[str, set[int]] = {"lora": set(), **{k: set() for k in _VECTORS}}

    @property
    def occupied(self) -> set[int]:
        """The slots that hold an adapter's weights in this layer (LoRA factors or IA³/DoRA vectors)."""
        return set().union(*self.uses.values())

    def fits(self, w: SlotWeights) -> bool:
        """Whether ``w`` was made for a layer of this bank's shape and kind (out, in, embedding or not)."""
        return (w.out_features, w.in_features, w.embedding) == (self.out_features, self.in_features, self.embedding)

    # ---- writing -------------------------------------------------------------------------------
    def _grow(self, slot: int, rank: int, limit: int) -> None:
        if slot >= self.capacity or rank > self.r:
            cap = self.capacity if slot < self.capacity else min(max(slot + 1, 2 * self.capacity), limit)
            r = max(_padded(rank), self.r)
            A = torch.zeros(cap, self.in_features, r, dtype=self.dtype, device=self.device).transpose(1, 2)
            Bt = torch.zeros(cap, r, self.out_features, dtype=self.dtype, device=self.device)
            A[: self.capacity, : self.r] = self.A
            Bt[: self.capacity, : self.r] = self.Bt
            self.A, self.Bt = A, Bt
            for key, old in self.vectors.items():
                self.vectors[key] = self._vector(key, cap)
                self.vectors[key][: self.capacity] = old
            self.capacity, self.r = cap, r

    def _vector(self, key: str, cap: int) -> torch.Tensor:
        fill, side = _VECTORS[key]
        size = self.in_features if side == "in" else self.out_features
        return torch.full((cap, size), fill, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def write(self, slot: int, w: SlotWeights, limit: int) -> None:
        """Put ``w`` into ``slot`` (anything the slot held before is cleared first)."""
        self.clear(slot)
        self._grow(slot, w.rank, limit)
        if w.A is not None:
            self.A[slot, : w.rank] = w.A.to(self.dtype)
            self.Bt[slot, : w.rank] = (w.B * w.scaling).T.to(self.dtype)  # scaled once here, not per request
            self.rank[slot] = w.rank
            self.uses["lora"].add(slot)
        for key in _VECTORS:
            value = getattr(w, key)
            if value is not None:
                if key not in self.vectors:
                    self.vectors[key] = self._vector(key, self.capacity)
                self.vectors[key][slot] = value.to(self.dtype)
                self.uses[key].add(slot)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Make ``slot`` the identity at this layer again."""
        if slot not in self.occupied:
            return
        self.A[slot], self.Bt[slot] = 0, 0
        for key, tensor in self.vectors.items():
            tensor[slot] = _VECTORS[key][0]
        self.rank.pop(slot, None)
        for used in self.uses.values():
            used.discard(slot)

    # ---- reading -------------------------------------------------------------------------------
    def plan(self, ids: torch.Tensor, unique: frozenset[int], slots: Sequence[int] | None = None) -> LayerPlan | None:
        """Gather each row's factors for one request; None when no row's adapter touches this layer.

        ``slots`` is ``ids`` as a list, when the caller has it: deciding what to gather on the host
        keeps a CUDA request free of per-layer synchronisations and small kernels.
        """
        if not unique & self.occupied:
            return None
        single = len(unique) == 1
        slots = ids.tolist() if slots is None else list(slots)
        if max(slots) >= self.capacity:  # slots this layer never held are the identity here
            slots = [s if s < self.capacity else 0 for s in slots]
            ids = torch.tensor(slots, dtype=ids.dtype, device=ids.device)
        plan = LayerPlan(rows=len(slots), ids=ids, single=single)
        pick = [min(unique)] if single else slots  # (1,) or (b,)
        lora = unique & self.uses["lora"]
        if lora:
            # Rows with smaller ranks read zero padding; the compiled kernel takes columns 8 at a time.
            r = max(self.rank[s] for s in lora)
            r = _padded(r) if cpu_kernel.wants(self.A) else r
            Bt = gather_rows(self.Bt[:, :r], pick)  # (b, r, out)
            plan.Bt = Bt[0] if single else Bt  # (r, out) or (b, r, out)
            if self.embedding and not single:
                plan.A = self.A[:, :r]  # looked up per token: gathering would copy r x vocab per row
            else:
                # gathered in the stored (in, r) layout, then seen as (b, r, in) again
                A = gather_rows(self.A[:, :r].transpose(1, 2), pick).transpose(1, 2)
                plan.A = A[0] if single else A
        for key in _VECTORS:
            if unique & self.uses[key]:
                setattr(plan, key, gather_rows(self.vectors[key], pick))  # (b, n) or (1, n)
        return plan


class AdapterBank:
    """Adapters by name in at most ``max_slots`` slots, least recently used evicted first.

    Args:
        max_slots: how many adapters may be resident at once (the "__base__" slot comes on top).
    """

    def __init__(self, max_slots: int = 8) -> None:
        if not isinstance(max_slots, int) or max_slots < 1:
            raise ValueError(f"max_slots must be a positive int (adapters resident at once), got {max_slots!r}")
        self.max_slots = max_slots
        self.layers: dict[str, LayerBank] = {}
        self._sources: dict[str, AdapterSource] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._signature: dict[str, Hashable] = {}
        self._slot_layers: dict[int, set[str]] = {}
        self._pins: dict[str, int] = {}
        self.loads = 0  # slot writes so far (an evicted adapter that is requested again is reloaded)

    @property
    def resident(self) -> list[str]:
        """Names in slots now, least recently used first."""
        return list(self._resident)

    @property
    def registered(self) -> list[str]:
        """The names that can be requested: every adapter registered, resident in a slot or not."""
        return list(self._sources)

    def register(self, name: str, source: AdapterSource) -> None:
        """Make ``name`` servable; it is read from ``source`` when first requested (or reloaded after eviction)."""
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for 'no adapter' rows; pick another name")
        if name in self._resident:
            self.evict(name)
        self._sources[name] = source

    def forget(self, name: str) -> None:
        """Evict ``name`` and drop its source."""
        self._known(name)
        if name in self._resident:
            self.evict(name)
        del self._sources[name]

    def evict(self, name: str) -> None:
        """Free ``name``'s slot now (it stays registered and reloads when requested again)."""
        if self._pins.get(name):
            raise RuntimeError(f"adapter {name!r} is serving a request right now and cannot be evicted")
        slot = self._resident.pop(name)
        for path in self._slot_layers.pop(slot, ()):
            self.layers[path].clear(slot)
        self._signature.pop(name, None)

    def _known(self, name: str) -> None:
        if name not in self._sources:
            raise ValueError(f"no adapter named {name!r} is registered; known: {sorted(self._sources)} (or {BASE!r})")

    def ensure(self, names: Sequence[str]) -> dict[str, int]:
        """Make every named adapter resident and fresh; returns name -> slot, touching the LRU order."""
        wanted = list(dict.fromkeys(n for n in names if n != BASE))
        for n in wanted:
            self._known(n)
        if len(wanted) > self.max_slots:
            raise ValueError(
                f"the request names {len(wanted)} distinct adapters but the bank holds max_slots={self.max_slots}; "
                "raise max_slots or split the batch"
            )
        for n in wanted:
            signature = self._sources[n].signature()
            if n not in self._resident or self._signature.get(n) != signature:
                self._load(n, self._resident.get(n) or self._free_slot(keep=set(wanted)), signature)
            self._resident.move_to_end(n)
        return {n: self._resident[n] for n in wanted}

    def _free_slot(self, keep: set[str]) -> int:
        taken = set(self._resident.values())
        free = [s for s in range(1, self.max_slots + 1) if s not in taken]
        if free:
            return free[0]
        for victim in self._resident:  # least recently used first
            if victim not in keep and not self._pins.get(victim):
                slot = self._resident[victim]
                self.evict(victim)
                return slot
        raise RuntimeError(f"all {self.max_slots} slots are in use by running requests; raise max_slots")

    def _load(self, name: str, slot: int, signature: Hashable) -> None:
        weights = self._sources[name].read()  # read and check everything before touching the bank
        for path, w in weights.items():
            have = self.layers.get(path)
            if have is not None and not have.fits(w):
                raise ValueError(
                    f"adapter {name!r} at {path}: layer shape (out={w.out_features}, in={w.in_features}) does not "
                    f"match the bank's (out={have.out_features}, in={have.in_features}); "
                    "was it trained on another model?"
                )
        for path in self._slot_layers.pop(slot, ()):
            self.layers[path].clear(slot)
        for path, w in weights.items():
            if path not in self.layers:
                t = next(x for x in (w.A, w.in_scale, w.out_scale) if x is not None)
                self.layers[path] = LayerBank(w.out_features, w.in_features, w.embedding, t.dtype, t.device)
            self.layers[path].write(slot, w, self.max_slots + 1)
        self._slot_layers[slot] = set(weights)
        self._resident[name] = slot
        self._signature[name] = signature
        self.loads += 1

    @contextlib.contextmanager
    def request(self, adapter_names: Sequence[str], device=None) -> Iterator[tuple[torch.Tensor, frozenset[int]]]:
        """Slot ids (b,) for one batch, and the distinct slots; the adapters stay pinned until the block ends."""
        slots = self.ensure(adapter_names)
        if device is None:
            device = next((layer.device for layer in self.layers.values()), "cpu")
        ids = torch.tensor([0 if n == BASE else slots[n] for n in adapter_names], dtype=torch.long, device=device)
        for n in slots:
            self._pins[n] = self._pins.get(n, 0) + 1
        try:
            yield ids, frozenset(ids.tolist())
        finally:
            for n in slots:
                self._pins[n] -= 1
