"""Layer 4, the paper's recipe: the prompts and the story corpus the model writes, the sampler it is written with,
the activations and emotion vectors extracted from it, the held-out quality measurements and the layer choice, and
the bank."""
