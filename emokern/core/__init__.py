"""Layer 2, the model-independent state every engine shares: the vector bank (:mod:`.bank`), the steering-spec
language compiled to the op's tables (:mod:`.steering`), the supported model families and where their layers and
sites are (:mod:`.architecture`), the recorded trace and its pictures (:mod:`.trace`, :mod:`.trace_plots`), the 171
emotion words (:mod:`.emotions`) and the embedded offline models (:mod:`.models`).
Imports only :mod:`emokern.ops` and :mod:`emokern.util`."""
