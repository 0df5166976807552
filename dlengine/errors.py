"""The package's error types, in a module that imports nothing of dlengine, so that any module
(config.py, parallel/ep.py, ...) can raise them without an import cycle. `dlengine.config.ConfigError`
and `dlengine.ConfigError` are the same class."""

from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint or engine setting that cannot work; the message names the problem."""
