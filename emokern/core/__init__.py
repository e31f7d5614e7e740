"""Layer 2, the model-independent state every engine shares: the vector bank (:mod:`.bank`) and its llama.cpp
control-vector form (:mod:`.control_vectors`), the steering-spec language compiled to the op's tables
(:mod:`.steering`), the supported model families and where their layers and sites are (:mod:`.architecture`), the
recorded trace and its pictures (:mod:`.trace`, :mod:`.trace_plots`), chat prompts (:mod:`.chat`), the 171 emotion
words and their norms (:mod:`.emotions`) and the embedded offline models (:mod:`.models`).
Imports only :mod:`emokern.ops` and :mod:`emokern.util`."""
