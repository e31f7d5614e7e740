"""Layer 2, the model-independent state every engine shares: the vector bank, the steering-spec language compiled to
the op's tables, the recorded trace and its pictures, the 171 emotion words and the embedded offline models.
Imports only :mod:`emokern.ops` and :mod:`emokern.util`."""
