"""The type names the package shares."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any  # nested dicts, lists, tuples and dataclasses of arrays
Dtype = Any  # a jnp dtype, such as jnp.float32
Metrics = dict[str, jax.Array]  # one step's scalars, by name
