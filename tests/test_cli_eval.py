"""`deltatune eval`: token-weighted loss/perplexity, accuracy, adapters and run configs; on a tiny offline model."""
import json
import math

import pytest
import torch

import deltatune as dt
from deltatune.cli.eval import eval_loss
from deltatune.cli.main import main
from deltatune.data import Collator
from support_cli_generate import write_tiny_model
from support_data import write_jsonl

CONFIG = """\
model: {model}
data: {{source: {data}, eval_size: 6, max_length: 64}}
"""
TOPICS = ("business", "sports", "tech", "politics")


def topic_rows(n: int) -> list[dict]:
    """Chat rows whose answer is one of four topics (distinct first tokens: first-token scoring applies)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"messages": [{"role": "user", "content": f"What is the topic of article {i}?"},
                                  {"role": "assistant", "content": topic}], "label": topic})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a labelled chat file, a config pointing at both, and a LoRA adapter that changes outputs."""
    root = tmp_path_factory.mktemp("eval")
    folder = write_tiny_model(root / "tiny")
    data = write_jsonl(root / "data.jsonl", topic_rows(12))
    (root / "run.yaml").write_text(CONFIG.format(model=folder, data=data))
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(folder)
    torch.manual_seed(0)
    lora = dt.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dt.get_peft_model(model, lora).save_pretrained(root / "run" / "adapter")
    return root


def test_eval_loss_weighs_every_supervised_token_the_same_however_rows_are_batched(setup):
    from deltatune.cli.eval import eval_dataset
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.config import load_train_config

    model, tok = load_model_and_tokenizer(setup / "tiny")
    config = load_train_config(setup / "run.yaml")
    ds, _, _ = eval_dataset(config, tok, whole_source=True)
    collate = Collator(pad_token_id=tok.pad_token_id)
    one, four = eval_loss(model, ds, collate, batch_size=1), eval_loss(model, ds, collate, batch_size=4)
    # By hand: sum of -log p over every supervised next token, divided by their count.
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            keep = labels != -100
            nll -= logp[keep, labels[keep]].sum().item()
            count += int(keep.sum())
    assert one["tokens"] == four["tokens"] == count and one["examples"] == len(ds) == 12
    assert one["loss"] == pytest.approx(nll / count, rel=1e-5) and four["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert four["perplexity"] == pytest.approx(math.exp(four["loss"]))


def test_cli_scores_the_eval_split_with_loss_and_accuracy(setup, capsys):
    assert main(["eval", str(setup / "run.yaml"), "--json", str(setup / "base.json")]) == 0
    out = capsys.readouterr().out
    assert "on " + str(setup / "data.jsonl") + " (6 examples" in out  # the held-out split of 12 rows
    assert "base: loss " in out and "over 6 examples" in out and "base: accuracy " in out
    result = json.loads((setup / "base.json").read_text())["base"]
    assert result["loss"]["examples"] == 6 and result["accuracy"]["total"] == 6
    assert result["accuracy"]["scoring"] == "first_token"


def test_cli_with_an_adapter_uses_its_run_config_and_compares_with_the_base(setup, capsys, monkeypatch):
    from deltatune.train.config import load_train_config

    # A run folder as deltatune train leaves it: config.yaml next to adapter/.
    (setup / "run" / "config.yaml").write_text(load_train_config(setup / "run.yaml").to_yaml())
    monkeypatch.chdir(setup)
    assert main(["eval", "--adapter", "run/adapter", "--compare-base", "--json", "cmp.json"]) == 0
    out = capsys.readouterr().out
    assert "settings from run/config.yaml" in out and "adapter: loss" in out and "base: loss" in out
    both = json.loads((setup / "cmp.json").read_text())
    assert both["with_adapter"]["loss"]["loss"] != pytest.approx(both["base"]["loss"]["loss"])
    # The base line equals a run without the adapter.
    assert main(["eval", "run/config.yaml", "--json", "plain.json"]) == 0
    capsys.readouterr()
    plain = json.loads((setup / "plain.json").read_text())["base"]
    assert plain["loss"]["loss"] == pytest.approx(both["base"]["loss"]["loss"], rel=1e-6)
    assert plain["accuracy"]["correct"] == both["base"]["accuracy"]["correct"]


def test_cli_scores_a_whole_file_in_another_format(setup, capsys):
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(5)]
    alpaca = write_jsonl(setup / "alpaca.jsonl", rows)
    assert main(["eval", str(setup / "run.yaml"), "--data", str(alpaca), "--max-examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "(5 examples" in out and "over 3 examples" in out and "accuracy" not in out  # no label column


def test_errors_say_what_to_do(setup, capsys):
    assert main(["eval", str(setup / "run.yaml"), "data.eval_size=0"]) == 2
    assert "has no eval split" in capsys.readouterr().err
    assert main(["eval", str(setup / "run.yaml"), "--adapter", str(setup)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["eval", str(setup / "run.yaml"), "eval.acuracy=true"]) == 2
    assert "Did you mean 'accuracy'?" in capsys.readouterr().err


def test_eval_loss_and_first_token_accuracy_run_lora_layers_merged(setup, monkeypatch):
    """Scoring opts in to merged_inference (each LoRA layer as one matrix): same loss as the default path."""
    from deltatune.cli.eval import eval_dataset
    from deltatune.methods.lora import LoraLinear
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.config import load_train_config
    from deltatune.train.loss import causal_lm_loss
    from deltatune.train.metrics import score_accuracy

    model, tok = load_model_and_tokenizer(setup / "tiny")
    pm = dt.PeftModel.from_pretrained(model, str(setup / "run" / "adapter"))
    ds, template, _ = eval_dataset(load_train_config(setup / "run.yaml"), tok, whole_source=True)
    collate = Collator(pad_token_id=tok.pad_token_id)
    calls = []
    real = LoraLinear.merged_forward
    monkeypatch.setattr(LoraLinear, "merged_forward", lambda self, *a: calls.append(1) or real(self, *a))
    merged = eval_loss(pm, ds, collate, batch_size=4)
    # 12 rows in 3 batches, through q and v of 2 layers, each batch in two passes: the rows' shared
    # prefix (the chat template's system turn) once, then their remainders (train/shared_prefix.py)
    assert len(calls) == 3 * 4 * 2
    total = 0.0
    with torch.no_grad():  # the default low-rank path
        for i in range(0, 12, 4):
            loss, count = causal_lm_loss(pm, **collate([ds[j] for j in range(i, i + 4)]))
            total += float(loss) * int(count)
    assert len(calls) == 24
    assert merged["loss"] == pytest.approx(total / merged["tokens"], rel=1e-5)
    score_accuracy(pm, tok, ds, template=template, scoring="first_token")
    assert len(calls) > 12
