"""Integrations with libraries that recognise peft models by class (see each module's docstring)."""
from deltatune.integrations import transformers as _transformers
from deltatune.integrations import trl as _trl


def install() -> None:
    """Make transformers, accelerate and TRL treat deltatune's models and configs as peft's. Idempotent."""
    _transformers.install()
    _trl.install()
