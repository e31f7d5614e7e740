"""Layer 3, where vectors meet a running model: the Hugging Face patch (:mod:`.hf`), training through it
(:mod:`.training`) and the vLLM plugin (:mod:`.vllm`). Each imports :mod:`emokern.core` and :mod:`emokern.ops`, never
another engine's internals."""
