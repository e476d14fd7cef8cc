"""The adapter methods, one per module; importing this package registers the built-in ones
(:mod:`deltatune.registry`)."""
from deltatune.methods import adalora, bitfit, bottleneck, ia3, lora, partial, prefix, prompt, trainable_tokens  # noqa: F401
