"""Training in the core: the train state, the pure step, the optimizer, and
what a run builds from its config (``builders``)."""
