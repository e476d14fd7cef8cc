"""How a ported example runs against the oracle: the changed import line, a shared start, the comparison.

Every ported example is a function ``example(lib, ...)`` whose first line is its ``from peft import ...``
with ``lib`` in place of ``peft``. A test runs it with ``"deltatune"`` and with ``"peft"`` and compares.
"""
from __future__ import annotations

import importlib
import os

import torch

from tolerances import assert_close


def imports(lib: str, names: str):
    """``from <lib> import <names>``: the one line a port changes (``lib`` is "peft" or "deltatune")."""
    module = importlib.import_module(lib)
    found = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if not hasattr(module, name):
            raise ImportError(f"cannot import name {name!r} from {lib!r}")
        found.append(getattr(module, name))
    return found[0] if len(found) == 1 else tuple(found)


class SameStart:
    """Makes the peft oracle run start from the adapter weights the deltatune run started from.

    The two libraries draw random initial weights (LoRA's A, soft prompts) in different orders, so a
    seed alone does not give the same start. Called right after ``get_peft_model``: the first call (the
    deltatune run) records the adapter in peft's on-disk key format, the second (the peft run) loads it
    with peft's ``set_peft_model_state_dict``, so this also checks that the keys agree. Both calls then
    reseed torch, because creating the adapter drew a different number of random numbers in each library
    and the example's later draws (shuffling, dropout) must match.
    """

    def __init__(self):
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, lib: str, model):
        get_sd, set_sd = imports(lib, "get_peft_model_state_dict, set_peft_model_state_dict")
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in get_sd(model).items()}
            torch.manual_seed(1234)
            return model
        expected = get_sd(model).keys()
        assert expected == self.state.keys(), (
            f"the adapters differ: only in the first run {sorted(self.state.keys() - expected)}, "
            f"only in this {lib} run {sorted(expected - self.state.keys())}")
        result = set_sd(model, self.state)
        # peft loads a prompt separately, then reports its key as unexpected by load_state_dict
        # and with bias="all" plus modules_to_save, peft's own state dict has the copy's bias under
        # "modules_to_save.bias", which its loader then calls unexpected (it loads through another path)
        unexpected = [k for k in getattr(result, "unexpected_keys", [])
                      if k != "prompt_embeddings" and not k.endswith(".modules_to_save.bias")]
        assert not unexpected, unexpected
        now = {k: v for k, v in get_sd(model).items() if k in self.state}
        assert all(torch.equal(now[k], v) for k, v in self.state.items())
        torch.manual_seed(1234)
        return model


def adapter_files(folder: str) -> dict:
    """File names (peft's model card ``README.md`` included) and saved tensors of an adapter folder."""
    from safetensors.torch import load_file

    names = sorted(os.listdir(folder))
    return {"files": names, **load_file(os.path.join(folder, "adapter_model.safetensors"))}


def shapes(saved: dict) -> dict:
    """What can be compared of two trainings that drew different dropout masks: names and shapes."""
    return {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in saved.items()}


def assert_same(ours, theirs, scale: float = 1.0, path: str = ""):
    """Two runs of one example agree: floats within the "reordered" tolerance tier, everything else equal.

    "reordered": deltatune computes LoRA with fused kernels that sum in another order than peft's
    autograd, and a few optimizer steps through a whole model carry that rounding into every result.
    """
    if isinstance(theirs, dict):
        ours = {k: v for k, v in ours.items() if not k.startswith("_")}  # "_model": objects, not results
        theirs = {k: v for k, v in theirs.items() if not k.startswith("_")}
        assert ours.keys() == theirs.keys(), (path, sorted(ours), sorted(theirs))
        for key in theirs:
            assert_same(ours[key], theirs[key], scale, f"{path}.{key}")
    elif torch.is_tensor(theirs) and theirs.is_floating_point():
        assert_close(ours, theirs, scale=scale, tier="reordered")
    elif torch.is_tensor(theirs):
        assert torch.equal(ours, theirs), path
    elif isinstance(theirs, float) or (isinstance(theirs, (list, tuple)) and theirs and isinstance(theirs[0], float)):
        assert_close(torch.tensor(ours), torch.tensor(theirs), scale=scale, tier="reordered")
    else:
        assert ours == theirs, path
