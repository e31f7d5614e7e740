"""Progress bars for long work: one look (tqdm, with rate and ETA) everywhere in the package."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, *, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A tqdm bar over ``total`` steps (``initial`` already done) with rate and ETA; a silent one when ``enabled`` is
    False. tqdm is imported on the first call, not at import."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
