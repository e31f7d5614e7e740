"""Layer 0, small helpers every other layer may use, each written once: atomic file writes (:mod:`.files`),
matplotlib figures on their own Agg canvas (:mod:`.figures`), correlation and unit normalisation (:mod:`.stats`),
"did you mean" suggestions (:mod:`.names`). Nothing here imports another part of emokern."""
