"""``LoraConfig._register_custom_module`` (peft's experimental custom-layer hook, docs/api.md "Custom layer
types"): refused with an error that names the mapping and says what to do instead, and the alternatives
it names work."""
import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from tolerances import assert_close


class Gate(nn.Module):
    """A user layer type: a linear map followed by a learned gate."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n)
        self.gate = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.proj(x) * torch.sigmoid(self.gate)


class CustomLora(nn.Module):
    """Stands in for a user's subclass of peft's LoRA layer."""


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Gate(8), nn.Linear(8, 2))


def test_register_custom_module_is_refused_with_the_alternatives():
    config = dt.LoraConfig(target_modules=["2"])
    with pytest.raises(NotImplementedError) as err:
        config._register_custom_module({Gate: CustomLora})
    message = str(err.value)
    assert "{'Gate': 'CustomLora'}" in message  # names what was asked for
    for hint in ("target_modules", "nn.Linear layers inside it", "register_method", "use peft"):
        assert hint in message, hint
    # peft accepts the same call (it is the hook the custom-models page documents).
    peft.LoraConfig(target_modules=["2"])._register_custom_module({Gate: CustomLora})


def test_a_custom_layer_type_as_target_is_an_error_listing_what_can_be_wrapped():
    with pytest.raises(ValueError, match=r"matched '2' \(a Gate\), which LORA cannot wrap; supported layer types: Linear"):
        dt.get_peft_model(model(), dt.LoraConfig(target_modules=["2"]))


def test_targeting_the_linear_inside_the_custom_layer_matches_peft():
    kw = dict(r=2, target_modules=["2.proj", "3"], init_lora_weights=False)
    mine = dt.get_peft_model(model(), dt.LoraConfig(**kw)).eval()
    theirs = peft.get_peft_model(model(), peft.LoraConfig(**kw)).eval()
    assert mine.targeted_module_names == theirs.targeted_module_names == ["2.proj", "3"]
    dt.set_peft_model_state_dict(mine, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert (mine(x) - model()(x)).abs().max() > 1e-4
        assert_close(mine(x), theirs(x))
