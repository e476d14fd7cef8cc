"""Packing: rows hold several examples that cannot see each other, checked on a tiny LLaMA's loss."""
import datasets
import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, tiny_llama
from tolerances import assert_close

from deltatune.data.packing import Collator, block_causal_mask, pack_examples
from deltatune.data.tokenize import IGNORE_INDEX


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        # Label the second half only, as a prompt/answer split would.
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return datasets.Dataset.from_list(rows)


def test_pack_examples_keeps_every_token_and_restarts_positions():
    ds = _examples([7, 5, 9, 3, 12, 4])
    packed = pack_examples(ds, max_length=16)
    assert all(len(r) <= 16 for r in packed["input_ids"][:])
    assert sum(len(r) for r in packed["input_ids"][:]) == 40
    assert len(packed) == 3  # 40 tokens need at least 3 rows of 16; best-fit decreasing finds 3
    seen = []
    for row in packed:
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [len(row["input_ids"])]
        for s, e in zip(bounds, bounds[1:]):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX  # nothing may learn to predict an example's first token
            seen.append(row["input_ids"][s:e])
    assert sorted(seen) == sorted(ds["input_ids"][:])
    assert pack_examples(ds, max_length=16).to_list() == packed.to_list()  # deterministic


def test_pack_examples_rejects_examples_longer_than_a_row():
    with pytest.raises(ValueError, match=r"1 example\(s\) \(first: row 1, 9 tokens\) exceed max_length=8"):
        pack_examples(_examples([3, 9]), max_length=8)


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    allowed = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0] == 0, allowed)
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_collator_pads_unpacked_rows():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "label": "x"},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_collator_gives_padding_of_packed_rows_its_own_block():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 4], "labels": [-100, 4], "position_ids": [0, 1]}]
    batch = Collator(pad_token_id=0, pad_to_multiple_of=3)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3]]
    assert batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].shape == (2, 1, 6, 6)
    no_mask = Collator(pad_token_id=0, packed_mask="position_ids")(rows)
    assert "attention_mask" not in no_mask


def _token_losses(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")  # (B, T-1)
    return losses * labels.ne(IGNORE_INDEX)


def _alone_and_packed(model, collator, lengths, **forward):
    ds = _examples(lengths, seed=3)
    alone = [_token_losses(model, collator([row]) | forward).sum() for row in ds]
    packed_ds = pack_examples(ds, max_length=24)
    assert len(packed_ds) < len(ds)  # something was actually packed
    batch = collator(packed_ds.to_list()) | forward
    per_token = _token_losses(model, batch)  # (B, T-1)
    # Sum each example's token losses inside its packed row, keyed by its tokens.
    totals = {}
    for b, row in enumerate(packed_ds):
        pos, ids = row["position_ids"], row["input_ids"]
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(ids)]
        for s, e in zip(starts, starts[1:]):
            totals[tuple(ids[s:e])] = per_token[b, s:e - 1].sum()
    return torch.stack(alone), torch.stack([totals[tuple(r["input_ids"])] for r in ds])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_example_loss_is_the_same_packed_as_alone_with_the_4d_mask(attn):
    model = tiny_llama(layers=2)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        alone, packed = _alone_and_packed(model, Collator(pad_token_id=0), [9, 6, 11, 5, 7, 4])
    assert_close(packed, alone, tier="reordered")  # sums of ~5 token losses over 2 layers


def test_position_ids_alone_separate_examples_only_without_a_cache():
    model = tiny_llama(layers=2)
    collator = Collator(pad_token_id=0, packed_mask="position_ids")
    with torch.no_grad():
        alone, packed = _alone_and_packed(model, collator, [9, 6, 11, 5, 7, 4], use_cache=False)
        assert_close(packed, alone, tier="reordered")
        # Canary for a transformers behaviour the 4D default avoids: with a cache (LLaMA's default),
        # transformers 5.23 skips packed-sequence detection and examples attend to each other.
        alone, leaky = _alone_and_packed(model, collator, [9, 6, 11, 5, 7, 4], use_cache=True)
        assert not torch.allclose(leaky, alone, atol=1e-4)


def test_packed_4d_mask_also_works_in_bfloat16():
    model = tiny_llama(layers=2).to(torch.bfloat16)
    with torch.no_grad():
        alone, packed = _alone_and_packed(model, Collator(pad_token_id=0), [9, 6, 11, 5])
    assert_close(packed.float(), alone.float(), dtype=torch.bfloat16, tier="reordered")
