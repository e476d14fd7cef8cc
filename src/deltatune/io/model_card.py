"""The ``README.md`` model card that ``save_pretrained`` writes beside the adapter, as peft does.

The Hub reads its front matter: ``library_name: peft`` (the files are peft's format, so peft's loader
and the Hub's peft widgets apply), ``base_model`` (links the adapter to its base, and lets inference
providers serve it), and tags. A card that is already there keeps its text; only those fields and a
"Framework versions" line are added, so a user's own description survives every save.
"""
from __future__ import annotations

from pathlib import Path

from deltatune.atomic import atomic_write_text

CARD_NAME = "README.md"


def write_model_card(folder: str | Path, base_model: str | None, tags: list[str], pipeline_tag: str | None,
                     version: str) -> Path:
    """Create or update ``folder/README.md`` (see the module docstring)."""
    from huggingface_hub import ModelCard, ModelCardData

    file = Path(folder) / CARD_NAME
    card = ModelCard.load(file) if file.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    old_tags = card.data.get("tags") or []
    card.data["tags"] = sorted(set(old_tags) | set(tags))
    if pipeline_tag and not card.data.get("pipeline_tag"):
        card.data["pipeline_tag"] = pipeline_tag
    if base_model:
        card.data["base_model"] = base_model
    line = f"- deltatune {version} (peft's adapter format)"
    lines = card.text.splitlines()
    if line not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, line)
        else:
            lines.append(f"{heading}\n\n{line}")
    card.text = "\n".join(lines)
    atomic_write_text(file, str(card))
    return file
