"""The name under which a Hugging Face model passes its key/value cache, across transformers versions."""

from __future__ import annotations

import inspect

__all__ = ["cache_argument"]


def cache_argument(module) -> str:
    """``"cache"`` when ``module.forward`` takes a keyword of that name (newer transformers), else
    ``"past_key_values"`` (older ones): the keyword that hands a model its key/value cache, and the name of the
    output field that returns it."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
