"""What a test needs that the machine may lack: :func:`model_available` (an embedded model on disk)."""

from __future__ import annotations

__all__ = ["model_available"]


def model_available(name: str) -> bool:
    """Whether the embedded model ``name`` (a name of :func:`emokern.core.models.list_models`) can be loaded without
    a download: its package is installed or a complete cache exists. KeyError for a name not in the registry."""
    from emokern.core.models import list_models

    row = {r["name"]: r for r in list_models()}[name]
    return row["installed"] or row["cached"]
