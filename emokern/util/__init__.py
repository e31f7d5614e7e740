"""Layer 0, small helpers every other layer may use, each written once: atomic file writes (:mod:`.files`),
matplotlib figures on their own Agg canvas (:mod:`.figures`), correlation with its p-value and unit normalisation
(:mod:`.stats`), "did you mean" suggestions (:mod:`.names`), progress bars (:mod:`.progress`), checks of user-given
input files (:mod:`.input_files`), the package's data files (:mod:`.data_files`) and the transformers cache keyword
(:mod:`.kv_cache`). Nothing here imports another part of emokern."""
