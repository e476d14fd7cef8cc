"""The package version, in a module of its own so the modules ``deltatune`` imports can read it."""

__version__ = "0.1.0"
