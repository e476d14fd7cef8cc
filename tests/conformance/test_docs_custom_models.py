"""peft docs, ported: ``docs/source/developer_guides/custom_models.md`` (huggingface/peft main, 5d602fdb).

Snippets: the multilayer perceptron (model, ``named_modules``, config, ``print_trainable_parameters``
with the page's printed numbers, then "write our own fit loop"), the timm model (``timm`` is not
installed and has no hub here: a 3-layer stand-in with the module names the page prints, Conv2d
``mlp.fc1``/``mlp.fc2`` and a Linear ``head.fc``), a new transformers architecture (a tiny Mistral),
"verify parameters and layers", and the experimental dynamic dispatch of custom LoRA layers (shown on
``nn.Linear``, which the page says the mapping may also override, instead of an LSTM layer).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MistralConfig, MistralForCausalLM

from docs_support import imp, oracle, ours, same_start
from tolerances import assert_close


class MLP(nn.Module):
    def __init__(self, num_units_hidden=2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def mlp_snippet(lib, num_units_hidden=2000):
    LoraConfig = lib.LoraConfig  # from peft import LoraConfig

    config = LoraConfig(
        target_modules=["seq.0", "seq.2"],
        modules_to_save=["seq.4"],
    )
    get_peft_model = lib.get_peft_model  # from peft import get_peft_model

    torch.manual_seed(0)
    model = MLP(num_units_hidden)
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    return peft_model


def test_mlp_named_modules_and_the_pages_parameter_counts(capsys):
    print([(n, type(m)) for n, m in MLP(8).named_modules()])
    assert [n for n, _ in MLP(8).named_modules()] == ["", "seq"] + [f"seq.{i}" for i in range(6)]
    capsys.readouterr()
    oracle(mlp_snippet)
    printed_t = capsys.readouterr().out
    mine = ours(mlp_snippet)
    printed_o = capsys.readouterr().out
    # The page says "trainable params: 56,164 || all params: 4,100,164"; peft 0.21.2 itself prints
    # 52,162 trainable: r=8 LoRA on seq.0 (16,160) and seq.2 (32,000) plus the seq.4 copy (4,002). The
    # page's figure is stale, so peft's printout is the oracle and the total is the page's.
    assert printed_t.startswith("trainable params: 52,162 || all params: 4,100,164 || trainable%: 1.2722")
    assert printed_o == printed_t
    assert mine.get_nb_trainable_parameters() == (52_162, 4_100_164)


def fit(peft_model, steps=5):
    """"We can use any training framework we like, or write our own fit loop"."""
    torch.manual_seed(1)
    X, y = torch.randn(16, 20), torch.randint(0, 2, (16,))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.nll_loss(peft_model(X), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, peft_model(X).detach()


def test_mlp_own_fit_loop_trains_like_peft_and_round_trips(tmp_path):
    theirs = oracle(mlp_snippet, 16)
    mine = same_start(theirs, ours(mlp_snippet, 16))
    losses_t, out_t = oracle(lambda lib: fit(theirs))
    losses_o, out_o = fit(mine)
    assert losses_o[-1] < losses_o[0]
    assert_close(torch.tensor(losses_o), torch.tensor(losses_t))
    assert_close(out_o, out_t)
    # The trained seq.4 copy is saved with the adapter: peft loads ours onto a fresh MLP to the same outputs.
    mine.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = oracle(lambda lib: lib.PeftModel.from_pretrained(MLP(16), str(tmp_path)))
    X = torch.randn(4, 20)
    assert_close(reloaded(X), mine(X))


class _PoolFormerLike(nn.Module):
    """The layer names the page prints for timm/poolformer_m36 (stem.conv, stages.*.mlp.fc1/fc2, head.fc)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(*[nn.Module() for _ in range(2)])
        for stage in self.stages:
            stage.blocks = nn.Sequential(nn.Module())
            stage.blocks[0].mlp = nn.Module()
            stage.blocks[0].mlp.fc1 = nn.Conv2d(8, 16, 1)
            stage.blocks[0].mlp.fc2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem.conv(x)
        for stage in self.stages:
            mlp = stage.blocks[0].mlp
            x = x + mlp.fc2(torch.relu(mlp.fc1(x)))
        return self.head.fc(x.mean(dim=(2, 3)))


def timm_snippet(lib):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model
    torch.manual_seed(0)
    model = _PoolFormerLike()  # timm.create_model("timm/poolformer_m36.sail_in1k", pretrained=True, num_classes=...)
    config = LoraConfig(target_modules=r".*\.mlp\.fc\d", modules_to_save=["head.fc"])
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    return peft_model


def test_timm_model_conv2d_targets_by_regex():
    theirs = oracle(timm_snippet)
    mine = ours(timm_snippet)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def mistral_snippet(lib):
    LoraConfig, get_peft_model = lib.LoraConfig, lib.get_peft_model  # from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    my_mistral_model = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=4,  # other LoRA arguments
    )
    peft_model = get_peft_model(my_mistral_model, config)
    return peft_model


def test_new_transformers_architecture_with_targets_from_a_similar_model():
    theirs = oracle(mistral_snippet)
    mine = ours(mistral_snippet)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    import deltatune
    import peft

    assert deltatune.get_peft_model_state_dict(mine).keys() == peft.get_peft_model_state_dict(theirs).keys()


def test_verify_parameters_print_trainable_parameters(capsys):
    oracle(mistral_snippet).print_trainable_parameters()
    printed_t = capsys.readouterr().out
    ours(mistral_snippet).print_trainable_parameters()
    assert capsys.readouterr().out == printed_t


def test_verify_layers_with_targeted_module_names(capsys):
    theirs = oracle(mistral_snippet)
    print(theirs.targeted_module_names)
    mine = ours(mistral_snippet)
    print(mine.targeted_module_names)
    assert mine.targeted_module_names == theirs.targeted_module_names
    assert mine.targeted_module_names[0] == "model.layers.0.self_attn.q_proj"


def dynamic_dispatch_snippet(lib, tmp_path):
    LoraConfig, PeftModel, get_peft_model = lib.LoraConfig, lib.PeftModel, lib.get_peft_model
    LoraLinear = imp(lib, "tuners.lora.layer", "Linear")  # from peft.tuners.lora.layer import Linear

    class MyLoraLinearLayer(LoraLinear):
        calls = 0

        def forward(self, x, *args, **kwargs):
            MyLoraLinearLayer.calls += 1
            return super().forward(x, *args, **kwargs)

    torch.manual_seed(0)
    base_model = MLP(16)
    config = LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)
    custom_module_mapping = {nn.Linear: MyLoraLinearLayer}
    config._register_custom_module(custom_module_mapping)
    peft_model = get_peft_model(base_model, config)
    out = peft_model(torch.ones(2, 20))
    # saving works as always and includes the parameters of the custom modules
    peft_model.save_pretrained(tmp_path / "lora-custom-module")

    torch.manual_seed(0)
    model = MLP(16)
    config = LoraConfig.from_pretrained(tmp_path / "lora-custom-module")
    config._register_custom_module(custom_module_mapping)
    loaded = PeftModel.from_pretrained(model, tmp_path / "lora-custom-module", config=config)
    return out, loaded(torch.ones(2, 20)), MyLoraLinearLayer.calls, type(loaded.base_model.model.seq[0]).__name__


def test_dynamic_dispatch_of_custom_modules(tmp_path):
    # Documented refusal (docs/api.md, "Custom layer types"): a custom layer subclasses peft's LoRA layer
    # classes, which deltatune does not have, so the snippet stops at that import, and the call itself
    # raises an error naming the mapping and what to do instead, rather than being ignored.
    out_t, loaded_t, calls_t, kind_t = oracle(dynamic_dispatch_snippet, tmp_path / "peft")
    assert calls_t == 4 and kind_t == "MyLoraLinearLayer"
    assert_close(loaded_t, out_t)
    with pytest.raises(ImportError, match="deltatune.tuners"):  # no peft layer classes to subclass
        ours(dynamic_dispatch_snippet, tmp_path / "ours")

    class MyLoraLinearLayer(nn.Module):  # whatever the class, the mapping cannot be honoured
        pass

    LoraConfig, get_peft_model = ours(lambda lib: (lib.LoraConfig, lib.get_peft_model))
    config = LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)
    with pytest.raises(NotImplementedError, match=r"_register_custom_module\(\{'Linear': 'MyLoraLinearLayer'\}\).*target_modules"):
        config._register_custom_module({nn.Linear: MyLoraLinearLayer})
    model = get_peft_model(MLP(16), config)  # the config is untouched: the plain LoRA layers work as before
    assert model(torch.ones(2, 20)).shape == (2, 2)
