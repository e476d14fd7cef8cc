"""End to end on the real SmolLM2-135M-Instruct: a few LoRA steps on a slice of BBC news.

Checks that the loss on the training batch goes down and that the saved adapter round-trips
(save -> PeftModel.from_pretrained on a fresh base model -> the same logits). ~30-60 s on two idle cores.
"""
import pytest
import torch

from deltatune.data import IGNORE_INDEX
from deltatune.model import PeftModel
from deltatune.models import load_model_and_tokenizer
from deltatune.train.config import load_train_config
from deltatune.train.run import run_training
from tolerances import assert_close

pytestmark = pytest.mark.slow


def test_default_model_learns_and_its_adapter_round_trips(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = load_train_config(None, [
            "data.article_tokens=32", "data.max_length=96", "data.eval_size=5", "data.max_train_examples=24",
            "train.max_steps=6", "train.batch_size=4", "train.lr=2e-3", "train.warmup_ratio=0", "train.logging_steps=1",
            "train.eval_steps=0", "train.save_steps=0", "train.progress_bar=false", "train.tensorboard=false",
            "train.plot=false", "eval.accuracy=false", f"output_dir={tmp_path / 'run'}",
        ])
        result = run_training(config, log=print)
        assert result.status == "completed"
        model = result.model.eval()
        batch = result_batch(config)
        with torch.no_grad():
            trained = model(**batch)
            with model.disable_adapter():
                base_loss = model(**batch).loss
        assert trained.loss < base_loss - 0.5, (float(base_loss), float(trained.loss))
        losses = [loss for _, loss in result.metrics["train"]["train_loss"]]
        assert losses[-1] < losses[0]

        fresh, _ = load_model_and_tokenizer(config.model)
        reloaded = PeftModel.from_pretrained(fresh, result.output_dir / "adapter")
        with torch.no_grad():
            assert_close(reloaded(**batch).logits, trained.logits)
    finally:
        torch.set_num_threads(threads)


def result_batch(config):
    """The first four training rows, padded: the loss is measured where the model was trained."""
    from deltatune.train.run import prepare_data

    _, prepared = prepare_data(config, log=lambda line: None)
    rows = [prepared.train[i] for i in range(4)]
    batch = prepared.collator(rows)
    assert (batch["labels"] != IGNORE_INDEX).any()
    return batch
