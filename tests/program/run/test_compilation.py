"""eqco_jax.program.run.compilation: where the persistent cache is, and a
step compiled again from it."""

import jax
import jax.numpy as jnp
from jax._src import compilation_cache  # reset_cache: tests only

from eqco_jax.program.run import compilation


def test_the_cache_folder_is_the_configs_the_environments_or_the_default(
    monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    assert compilation.use_cache("") is None  # off
    assert compilation.use_cache(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compilation.use_cache(None) == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.use_cache(None) == str(
        tmp_path / "home" / ".cache" / "eqco_jax" / "jax_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_step_compiled_again_comes_from_the_cache(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    compilation.use_cache(str(tmp_path))
    step = lambda x: jnp.sin(x) * 3.0 + jnp.cumsum(x)  # a program of its own
    args = (jnp.arange(7.0),)
    _, _, first = compilation.compile_step(jax.jit(step), *args)
    jax.clear_caches()  # the in-memory cache; the persistent one stays
    compiled, _, second = compilation.compile_step(jax.jit(step), *args)
    assert (first, second) == (False, True)
    assert float(compiled(*args)[1]) == float(step(*args)[1])
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()  # the next compile opens the suite's
