"""eqco-jax: EqCo and SiMo (Equivalent Rules for Contrastive Learning) in JAX/Flax."""

__version__ = "0.1.0"
