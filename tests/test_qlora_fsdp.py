"""QLoRA + FSDP2 on CPU (gloo): the 4-bit base is sharded, and training matches one process.

One ``torchrun --nproc_per_node 2`` launch of this file (the worker, ``__main__`` below) builds the
same tiny QLoRA LLaMA on each rank (``quantize_model`` + ``prepare_model_for_kbit_training`` with
gradient checkpointing + LoRA), keeps an unsharded copy as the single-process reference, then
``prepare_for_fsdp`` + ``fully_shard`` on every decoder layer and the root. It saves what the test
compares:

* the packed 4-bit bytes each rank holds (about half of the whole: FSDP2 splits each 1-D packed
  weight in two), and the type/shape of ``qweight`` between forwards (a DTensor shard) and inside
  forward (the full, all-gathered tensor);
* the logits of its half of the batch, against the reference on the same rows: the same operations
  on the same all-gathered bytes, so the ``exact`` tier (measured: bit-identical);
* after 3 SGD steps on the same global batch of 4 (2 rows per rank; FSDP averages the two ranks'
  gradients, which equals the 4-row mean loss's gradient since every row has the same token count),
  the LoRA weights gathered by ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``,
  against the reference trained on all 4 rows: the gradient is a 2-term sum in another order, so the
  ``reordered`` tier, as DDP's test (tests/test_distributed.py);
* the gathered packed weights, against the reference's bytes (exact: FSDP moves bytes, no arithmetic);
* a second model sharded with ``MixedPrecisionPolicy(param_dtype=bfloat16)``: the codes stay uint8.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS, LR, BATCH, SEQ = 3, 0.5, 4, 16


def _qlora_model():
    import deltatune as dt
    from deltatune.quant import QuantConfig, quantize_model
    from tiny import tiny_llama

    model = quantize_model(tiny_llama(hidden=64), QuantConfig())  # NF4, double quant, blocksize 64
    model = dt.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    cfg = dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    return dt.get_peft_model(model, cfg).train()


def _sgd(model, batch: torch.Tensor, steps: int = STEPS) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def worker(out: str) -> None:
    """The torchrun side: see the module docstring."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from deltatune.quant import Linear4bit
    from deltatune.quant.fsdp import packed_weight_bytes, prepare_for_fsdp
    from deltatune.train.distributed import end_process_group
    from tiny import input_ids

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _qlora_model()
    ref = copy.deepcopy(model)  # the single-process QLoRA model
    batch = input_ids(batch=BATCH, seq=SEQ)  # the global batch, the same on every rank
    rows = batch[rank * BATCH // world:(rank + 1) * BATCH // world]
    with torch.no_grad():
        ref_logits = ref(input_ids=rows).logits
    ref_losses = _sgd(ref, batch)
    packed_whole = packed_weight_bytes(model)

    prepare_for_fsdp(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, Linear4bit)
    seen = []
    q_proj.register_forward_pre_hook(lambda m, _: seen.append((isinstance(m.qweight, DTensor), tuple(m.qweight.shape))))
    between = (isinstance(q_proj.qweight, DTensor), tuple(q_proj.qweight.to_local().shape))
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    losses = _sgd(model, rows)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"packed_local": packed_weight_bytes(model), "packed_whole": packed_whole, "between": between,
              "inside": seen[0], "full_qweight_shape": q_proj.qweight.shape[0], "logits": logits,
              "ref_logits": ref_logits, "losses": losses, "ref_losses": ref_losses}
    if rank == 0:  # cpu_offload: the full state dict lands on rank 0 only
        trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
        initial = _qlora_model().state_dict()
        result.update(full={k: v for k, v in full.items() if k in trainable or k.endswith("qweight")},
                      ref=ref.state_dict(), initial={k: initial[k] for k in trainable}, trainable=sorted(trainable))
    # bf16 mixed precision casts floating parameters for the all-gather, but never the uint8 codes
    mixed = prepare_for_fsdp(_qlora_model())
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for layer in mixed.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=bf16)
    fully_shard(mixed, mesh=mesh, mp_policy=bf16)
    q_mixed = mixed.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    q_mixed.register_forward_pre_hook(lambda m, _: seen.append(m.qweight.dtype))
    with torch.no_grad():
        result.update(mixed_logits=mixed(input_ids=rows).logits.float(), mixed_qweight_dtype=seen[-1])
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # the ranks meet before the group goes, as `deltatune train` does: once, on a fresh clone's first CI run,
    # rank 1 aborted here ("terminate called without an active exception") after a bare destroy
    end_process_group(wait=True)


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_prepare_for_fsdp_changes_no_number_count_or_key(storage):
    from deltatune.quant import Linear4bit, prepare_for_fsdp, quantized_layers
    from tiny import input_ids

    model = _qlora_model()
    prepared = prepare_for_fsdp(copy.deepcopy(model), storage)
    layers = [m for _, m in quantized_layers(prepared)]
    assert layers and all(isinstance(m, Linear4bit) and isinstance(m.qweight, torch.nn.Parameter)
                          and not m.qweight.requires_grad and m.qweight.dtype == getattr(torch, storage)
                          for m in layers)
    x = input_ids(batch=2, seq=8)
    out, out_p = model(input_ids=x, labels=x), prepared(input_ids=x, labels=x)
    assert torch.equal(out.logits, out_p.logits)  # the same bytes, read through a view
    grads = [torch.autograd.grad(m.loss, [p for p in mm.parameters() if p.requires_grad])
             for m, mm in ((out, model), (out_p, prepared))]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert prepared.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    sd, sd_p = model.state_dict(), prepared.state_dict()
    assert sd.keys() == sd_p.keys()
    if storage == "uint8":  # the on-disk format is unchanged, and old state dicts load
        assert all(torch.equal(sd[k], sd_p[k]) for k in sd)
        prepared.load_state_dict(sd)
    prepared.to(torch.float16)  # a dtype move must not reinterpret the packed bytes
    assert all(m.qweight.dtype == getattr(torch, storage) for m in layers)
    plain = next(m for _, m in quantized_layers(model))
    assert torch.equal(layers[0].packed_weight, plain.qweight)
    dense = torch.randn(plain.out_features, plain.in_features, generator=torch.Generator().manual_seed(2))
    plain.requantize_(dense)  # merging writes new codes through the same view
    layers[0].requantize_(dense)
    assert torch.equal(layers[0].packed_weight, plain.qweight)


def test_a_cast_float_storage_is_refused_and_bad_input_explained():
    from deltatune.quant import prepare_for_fsdp, quantized_layers
    from tiny import input_ids, tiny_llama

    model = prepare_for_fsdp(_qlora_model(), torch.bfloat16)
    layer = next(m for _, m in quantized_layers(model))
    layer.qweight.data = layer.qweight.data.float()  # what MixedPrecisionPolicy(param_dtype=float32) would do
    with pytest.raises(RuntimeError, match="MixedPrecisionPolicy"):
        model(input_ids=input_ids())
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        prepare_for_fsdp(_qlora_model(), "int4")
    with pytest.raises(ValueError, match="quantize it first"):
        prepare_for_fsdp(tiny_llama())


def test_qlora_under_fsdp2_shards_the_4bit_base_and_trains_like_one_process(tmp_path):
    from test_distributed import torchrun
    from tolerances import assert_close

    torchrun([str(Path(__file__)), str(tmp_path)], cwd=HERE)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # (a) each rank holds half of the packed bytes (FSDP2 gives rank 0 the rounded-up half of each weight)
    whole = r0["packed_whole"]
    assert r0["packed_local"] + r1["packed_local"] == whole
    assert abs(r0["packed_local"] - whole / 2) <= 14  # at most 1 byte per packed weight (7 per layer x 2 layers)
    assert r0["between"][0] and r0["between"][1][0] < r0["full_qweight_shape"]  # a DTensor shard between forwards
    assert r0["inside"] == (False, (64 * 64 // 2,))  # the whole plain tensor inside forward
    # (b) logits: the same bytes and ops as one process
    for r in (r0, r1):
        assert_close(r["logits"], r["ref_logits"], tier="exact")
    # (c) LoRA weights after 3 SGD steps, gathered to full shapes, and (d) every LoRA tensor present
    trainable = r0["trainable"]
    assert trainable and set(trainable) <= set(r0["full"])
    moved = max((r0["ref"][k] - r0["initial"][k]).abs().max().item() for k in trainable)
    assert moved > 1e-2  # training really moved the adapter, so the comparison means something
    for k in trainable:
        assert r0["full"][k].shape == r0["ref"][k].shape, k
        assert_close(r0["full"][k], r0["ref"][k], tier="reordered")
    for k, v in r0["full"].items():
        if k.endswith("qweight"):
            assert torch.equal(v, r0["ref"][k]), k
    # bf16 mixed precision leaves the uint8 codes alone: bf16 weights put the logits within bf16's unit of
    # fp32's (measured 1.2e-2 at most); scrambled codes would move them by the logits' own size (~0.5)
    for r in (r0, r1):
        assert r["mixed_qweight_dtype"] == torch.uint8
        assert_close(r["mixed_logits"], r["ref_logits"], dtype=torch.bfloat16)
    # the loss curve: the mean of the two ranks' losses is the 4-row loss
    assert_close(torch.tensor(r0["losses"]) / 2 + torch.tensor(r1["losses"]) / 2, torch.tensor(r0["ref_losses"]),
                 tier="reordered")


if __name__ == "__main__":  # the FSDP worker: torchrun --nproc_per_node 2 tests/test_qlora_fsdp.py OUT
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))
    worker(sys.argv[1])
