"""Integrations with libraries that recognise peft models by class (see each module's docstring)."""
