"""``deltatune train`` with ``data.add_special_tokens``: the tokens join the tokenizer, the embeddings grow, only
the new rows (and the LoRA) train, and the adapter folder holds the tokenizer; peft loads the result."""
import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.config import load_train_config
from deltatune.train.run import run_training
from support_data import write_jsonl
from support_train import TOPICS, base_args, tiny_run_files  # noqa: F401  (fixture)
from tolerances import assert_close

NEW = ["<tool>", "</tool>"]


def _rows(n=12):
    return [{"messages": [{"role": "user", "content": f"Article {i} about {TOPICS[i % 3]}. Topic?"},
                          {"role": "assistant", "content": f"<tool>{TOPICS[i % 3]}</tool>"}]} for i in range(n)]


def test_add_special_tokens_trains_their_rows_and_saves_the_tokenizer(tiny_run_files, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    peft = pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "tools.jsonl", _rows())
    args = base_args(tiny_run_files, tmp_path / "run")[1:]
    args = [a for a in args if not a.startswith("data.source=")] + [
        f"data.source={data}", "data.eval_size=0", "train.max_steps=3", "train.lr=5e-2", "method.name=lora",
        "method.target_modules=[q_proj,v_proj]", "data.add_special_tokens=[<tool>,</tool>]",
    ]
    result = run_training(load_train_config(None, args), log=lambda line: None)
    assert result.status == "completed"
    adapter = result.output_dir / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok.convert_tokens_to_ids(NEW)
    assert ids == [320, 321] and len(tok) == 322  # the tiny tokenizer had 320 tokens
    config = result.model.peft_config["default"]
    assert list(config.trainable_token_indices) == ids
    saved = load_file(adapter / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (2, 32)
    assert saved["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"].shape == (322, 32)
    layer = result.model.base_model.model.model.embed_tokens.token_adapter
    assert not torch.equal(rows, layer.adapters["default"].original)  # the new rows trained
    assert not layer.base_layer.weight.requires_grad
    # peft loads it on a fresh base grown to the saved tokenizer, with equal logits
    base = LlamaForCausalLM.from_pretrained(tiny_run_files["model"])
    base.resize_token_embeddings(len(tok))
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    x = tok("Article 1 about sports. <tool>sports</tool>", return_tensors="pt")["input_ids"]
    assert set(ids) <= set(x[0].tolist())
    with torch.no_grad():
        assert_close(theirs(input_ids=x).logits, result.model.eval()(input_ids=x).logits)


def test_a_method_without_trainable_rows_is_refused_before_the_model_loads(tiny_run_files, tmp_path):
    from deltatune.train.config_check import ConfigError

    args = base_args(tiny_run_files, tmp_path / "run")[1:] + ["method.name=ia3", "data.add_special_tokens=[<tool>]"]
    with pytest.raises(ConfigError, match="use lora, dora, rslora, qlora or trainable_tokens"):
        run_training(load_train_config(None, args), log=lambda line: None)
    with pytest.raises(Exception, match="add_special_tokens"):
        load_train_config(None, ["data.add_special_tokens=[<a>,<a>]"])
