"""Label accuracy of a causal LM on a chat dataset with a ``label`` column (e.g. BBC news topics).

Two ways to read the model's answer:

- ``first_token``: one forward pass over the prompt (ending with the assistant header; prompts are
  left-padded into batches of 8 of similar length); the
  prediction is the label whose first answer token has the highest log-probability among the
  candidate labels' first tokens. Needs the labels' first tokens to be distinct (the five BBC
  topics' are). Cheap and deterministic, and it scores a model that would answer with extra words.
- ``greedy``: decode up to ``max_new_tokens`` greedily and compare the text (case- and
  punctuation-insensitive) with each label. Works for any labels; stricter, and slower.

``auto`` picks ``first_token`` when the first tokens are distinct, else ``greedy``.
"""
from __future__ import annotations

import string
import time
from collections import Counter
from typing import Any, Sequence

import torch

from deltatune.data.templates import generation_prompt, resolve_template
from deltatune.methods.lora import merged_inference
from deltatune.train.loss import SUPPORTED_MODEL_TYPES
from deltatune.train.shared_prefix import PrefixCache

SCORINGS = ("auto", "first_token", "greedy")
"""Accepted values of ``scoring``."""

OTHER = "(other)"
"""Prediction recorded when a greedy answer matches no label."""


def _answer_first_token(tokenizer: Any, prompt_ids: list[int], prompt: str, label: str) -> int:
    """The first token of ``label`` as it is tokenized after ``prompt`` (BPE merges may cross the seam)."""
    full = tokenizer(prompt + label, add_special_tokens=False)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids)]
    return tokenizer(label, add_special_tokens=False)["input_ids"][0]


def _normalize(text: str) -> str:
    return text.strip().strip(string.punctuation + string.whitespace).lower()


def _forward_last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of each row's last position, (b, V), computing only that position's projection when supported.

    Rows are left-padded, so the last position is every row's last real token; position ids count
    real tokens only, so a padded row sees the positions it would see alone.
    """
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs.update(attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:  # a model whose forward predates logits_to_keep
        out = model(**kwargs)
    return out.logits[:, -1]


def _model_device(model: Any) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _predict_first_token_batch(model, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
                               labels: Sequence[str], device, shared: PrefixCache | None = None) -> list[str]:
    """First-token predictions for several prompts in one padded forward pass."""
    firsts = torch.tensor([[_answer_first_token(tokenizer, ids, p, lab) for lab in labels]
                           for ids, p in zip(prompt_ids, prompts)])  # (b, L)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if shared is not None:  # the prompts' common prefix ran once, for the whole pass
        logits = shared.forward(model, prompt_ids, pad, device)
    elif len(prompts) == 1:
        logits = _forward_last_logits(model, torch.tensor(prompt_ids, device=device))
    else:
        logits = _forward_last_logits(model, *_left_pad(prompt_ids, pad, device))  # (b, V)
    scores = logits.float().log_softmax(-1).gather(1, firsts.to(logits.device))  # (b, L)
    return [labels[int(k)] for k in scores.argmax(-1)]


def _predict_greedy(model, tokenizer, prompt: str, labels: Sequence[str], device, max_new_tokens: int) -> tuple[str, str]:
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    wanted = {_normalize(lab): lab for lab in labels}
    answer = _normalize(text)
    first_word = answer.split()[0].strip(string.punctuation) if answer.split() else ""
    return wanted.get(answer, wanted.get(first_word, OTHER)), text


def first_tokens_distinct(tokenizer: Any, labels: Sequence[str], prompt: str = "") -> bool:
    """Whether every label starts with a different token (after ``prompt``)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    firsts = [_answer_first_token(tokenizer, prompt_ids, prompt, lab) for lab in labels]
    return len(set(firsts)) == len(firsts)


def score_accuracy(
    model: Any,
    tokenizer: Any,
    eval_dataset: Any,
    *,
    template: str = "auto",
    labels: Sequence[str] | None = None,
    scoring: str = "auto",
    max_examples: int | None = None,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` at answering each example's ``label``.

    Args:
        model: a causal LM (a transformers model or a deltatune ``PeftModel``).
        tokenizer: its tokenizer.
        eval_dataset: rows with ``messages`` (a final assistant message, if any, is dropped: it is
            the reference) and ``label`` (a string); a ``datasets.Dataset`` or a list of dicts.
        template: ``auto``, ``tokenizer`` or a built-in template name, as for training
            (:func:`deltatune.data.templates.resolve_template`).
        labels: the candidate answers; default the sorted distinct labels of ``eval_dataset``.
        scoring: ``first_token``, ``greedy`` or ``auto`` (see the module docstring).
        max_examples: score only the first this many rows.
        max_new_tokens: decoding budget for ``greedy``.
        progress: show a tqdm bar.

    Returns:
        ``{"accuracy", "correct", "total", "scoring", "labels", "per_label": {label: accuracy},
        "confusion": {gold: {predicted: count}}, "warnings": [str], "seconds"}``; ``warnings`` says
        when the number cannot be trusted (every row has the same label).

    Raises:
        ValueError: no rows, no ``label``/``messages`` column, a row without a label, an unknown
            ``scoring``, or ``first_token`` with labels sharing a first token.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not known; expected one of {', '.join(SCORINGS)}.")
    rows = eval_dataset if isinstance(eval_dataset, list) else None
    columns = set(rows[0]) if rows else set(getattr(eval_dataset, "column_names", None) or ())
    missing = {"messages", "label"} - columns
    if missing:
        raise ValueError(f"Accuracy needs 'messages' and 'label' columns in the eval data; missing {sorted(missing)}.")
    n = len(eval_dataset) if max_examples is None else min(max_examples, len(eval_dataset))
    if n == 0:
        raise ValueError("Accuracy needs at least one eval example; the eval dataset is empty.")
    raw_gold = eval_dataset["label"][:n] if rows is None else [r["label"] for r in rows[:n]]
    unlabelled = [i for i, g in enumerate(raw_gold) if g is None or (isinstance(g, str) and not g.strip())]
    if unlabelled:
        # str(None) would make "None" a class of its own, scored like any other label.
        raise ValueError(f"Accuracy needs a label on every eval row, but eval row {unlabelled[0] + 1} has no label "
                         f"({len(unlabelled)} of {n} rows lack one). Add the labels, or set data.on_bad_rows=drop "
                         "to skip such rows.")
    gold_all = [str(g) for g in raw_gold]
    labels = sorted(set(gold_all)) if labels is None else [str(lab) for lab in labels]
    resolved = resolve_template(template, tokenizer)
    first_prompt = generation_prompt(_messages(eval_dataset, 0), tokenizer, resolved)
    distinct = first_tokens_distinct(tokenizer, labels, first_prompt)
    if scoring == "auto":
        scoring = "first_token" if distinct else "greedy"
    elif scoring == "first_token" and not distinct:
        raise ValueError(f"scoring=first_token needs labels with distinct first tokens; {labels} share some. "
                         "Use scoring=greedy.")
    return _score(model, tokenizer, eval_dataset, n, gold_all, labels, resolved, scoring, max_new_tokens, progress)


def _warnings(gold: list[str]) -> list[str]:
    """Why an accuracy over these gold labels may mislead (empty when it does not)."""
    if len(set(gold)) != 1:
        return []
    only = gold[0]
    return [f"every eval example has the label {only!r}: a model that always answers {only!r} scores 100%, so "
            "accuracy over a single label says nothing; evaluate on examples of several labels"]


def _messages(ds: Any, i: int) -> list[dict]:
    return ds[i]["messages"]


def _score(model, tokenizer, ds, n, gold_all, labels, template, scoring, max_new_tokens, progress,
           batch_size: int = 8) -> dict[str, Any]:
    start = time.perf_counter()
    device = _model_device(model)
    was_training = model.training
    model.eval()
    confusion: dict[str, Counter] = {lab: Counter() for lab in labels}
    prompts = [generation_prompt(_messages(ds, i), tokenizer, template) for i in range(n)]
    if scoring == "first_token":
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # Batches of similar length waste little on padding: sort by prompt length.
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        groups = [[i] for i in range(n)]
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc=f"accuracy ({scoring})", leave=False)
    # First-token scoring forwards whole prompts, where each LoRA layer's merged weight costs less than
    # its low-rank path; greedy decoding runs a token per step, where forming it every call costs more.
    scope = merged_inference(model) if scoring == "first_token" else torch.no_grad()
    try:
        with scope:
            shared = None
            lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
            family = getattr(getattr(lm, "config", None), "model_type", None)
            # e.g. a system prompt every row starts with: its keys/values once, for the families the fused
            # loss already trusts to be a plain causal trunk
            if scoring == "first_token" and family in SUPPORTED_MODEL_TYPES:
                shared = PrefixCache.build(model, lm, prompt_ids, device)
            for group in groups:
                if scoring == "first_token":
                    preds = _predict_first_token_batch(model, tokenizer, [prompts[i] for i in group],
                                                       [prompt_ids[i] for i in group], labels, device, shared)
                else:
                    preds = [_predict_greedy(model, tokenizer, prompts[group[0]], labels, device, max_new_tokens)[0]]
                for i, pred in zip(group, preds):
                    confusion.setdefault(gold_all[i], Counter())[pred] += 1
    finally:
        model.train(was_training)
    correct = sum(c[g] for g, c in confusion.items())
    per_label = {g: c[g] / sum(c.values()) for g, c in confusion.items() if sum(c.values())}
    return {
        "accuracy": correct / n, "correct": correct, "total": n, "scoring": scoring, "labels": list(labels),
        "per_label": per_label, "confusion": {g: dict(c) for g, c in confusion.items()},
        "warnings": _warnings(gold_all), "seconds": time.perf_counter() - start,
    }


def describe(result: dict[str, Any]) -> str:
    """One line such as ``84.5% (169/200), first-token log-prob over 5 labels``, then any warnings."""
    how = ("first-token log-prob over" if result["scoring"] == "first_token" else "greedy decoding, exact match over")
    k = len(result["labels"])
    line = f"{100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']}), {how} {k} label{'s' * (k != 1)}"
    return "".join([line, *(f"; warning: {w}" for w in result.get("warnings", ()))])


def training_warnings(train_loss: list[tuple[int, float]], lr: float, peak_weight: float, diverged: float) -> list[str]:
    """Warnings about a run that completed but did not learn: its loss did not go down, or its weights exploded.

    Args:
        train_loss: the logged (step, training loss) pairs.
        lr: the run's peak learning rate (``train.lr``), named in the advice.
        peak_weight: the largest absolute value among the trained weights at the end.
        diverged: the weight magnitude above which a run counts as diverged.
    """
    out = []
    if peak_weight > diverged:
        out.append(f"the trained weights reach {peak_weight:.3g} (over {diverged:g}): training diverged; "
                   f"lower train.lr={lr:g} or raise train.warmup_ratio")
    losses = [loss for _, loss in train_loss]
    if len(losses) >= 4:
        k = max(1, len(losses) // 4)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        # Less than 1% lower after the whole run: the learning rate is far too low or too high.
        if last > first * 0.99:
            out.append(f"the training loss did not go down ({first:.4g} over the first {k} logged steps, {last:.4g} "
                       f"over the last {k}): check train.lr={lr:g} (too low, or too high) and the data")
    return out
