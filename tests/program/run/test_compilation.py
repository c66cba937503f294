"""eqco_jax.program.run.compilation: where the persistent cache is, a folder
that cannot be written said in one sentence, and a step compiled again from
the cache, on a local disk and in a bucket. (A two-process restart and the
cache's default beside its workdir: scenarios/test_launch.py, the TPU pod.)"""

import os
import subprocess
import time

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache  # reset_cache: tests only

import fakes
from eqco_jax.core.errors import UserError
from eqco_jax.program.run import compilation
from gcs_emulator import BUCKET, client_env, objects
from helpers import QUICK, command, environment


@pytest.fixture
def jax_cache():
  """Puts JAX's cache folder and its opened cache back after the test (the
  next compile opens the suite's again)."""
  before = jax.config.jax_compilation_cache_dir
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", before)
  compilation_cache.reset_cache()


def unwritable(location: str, error: str) -> str:
  return (f"cannot write to the compilation cache {location} ({error}); "
          "check that the location exists and that this machine's "
          "credentials (for gs://: gcloud auth application-default login, or "
          "the VM's service account) and network reach it, or set "
          "--config.compilation_cache_dir to a folder that every process of "
          "the run can write, or turn the cache off with "
          "--config.compilation_cache_dir=''.")


def test_the_cache_folder_is_the_configs_the_environments_the_workdirs_or_the_hosts(
    monkeypatch, tmp_path, jax_cache, emulator):
  where = compilation.cache_location
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  for multi_process in (False, True):
    assert where("", "gs://b/runs/a", multi_process=multi_process) is None
    assert where("/c", "gs://b/runs/a", multi_process=multi_process) == "/c"
    assert where(None, "gs://b/runs/a", multi_process=multi_process) == str(
        tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  # Beside a workdir that every host reaches: on object storage, or the
  # one workdir of several processes.
  for multi_process in (False, True):
    assert where(None, "gs://b/runs/a/", multi_process=multi_process) == (
        "gs://b/runs/jax_cache")
    assert where(None, "gs://b", multi_process=multi_process) == (
        "gs://b/jax_cache")
  assert where(None, "runs/a", multi_process=True) == os.path.abspath(
      "runs/jax_cache")
  assert where(None, "/a", multi_process=True) == "/a/jax_cache"
  assert where(None, "runs/a", multi_process=False) == compilation.DEFAULT_CACHE
  # use_cache writes to the folder (and leaves nothing there) and sets it.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  cache = tmp_path / "home" / ".cache" / "eqco_jax" / "jax_cache"
  assert compilation.use_cache(None, str(tmp_path / "run"),
                               multi_process=False) == str(cache)
  assert list(cache.iterdir()) == []
  assert jax.config.jax_compilation_cache_dir == str(cache)
  assert compilation.use_cache("", "runs/a", multi_process=True) is None
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError) as error:
    compilation.use_cache(str(tmp_path / "file" / "cache"), "runs/a",
                          multi_process=True)
  assert str(error.value) == unwritable(
      str(tmp_path / "file" / "cache"),
      "NotADirectoryError: [Errno 20] Not a directory: "
      f"'{tmp_path / 'file' / 'cache'}'")
  with pytest.raises(UserError) as error:  # (the suite's emulator)
    compilation.use_cache("gs://no-such-bucket/jax_cache", "runs/a",
                          multi_process=True)
  assert str(error.value) == unwritable(
      "gs://no-such-bucket/jax_cache",
      "FileNotFoundError: Bucket does not exist: no-such-bucket")


def test_a_cache_folder_that_does_not_answer_is_one_sentence_within_20_s(
    tmp_path):
  """From the program's launch (gcsfs alone would retry for a minute, and
  JAX warn at the first compile)."""
  cache = f"gs://{BUCKET}/jax_cache"
  env = client_env(f"http://127.0.0.1:{fakes.free_port()}", environment(1))
  began = time.time()
  result = subprocess.run(
      command(tmp_path / "run", f"--config.compilation_cache_dir={cache}",
              config=QUICK), env=env, capture_output=True, text=True,
      timeout=120)
  assert time.time() - began < 20
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: " + unwritable(cache, "TimeoutError: no answer within 10 s")]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_step_compiled_again_comes_from_the_cache(where, tmp_path, jax_cache,
                                                    request):
  if where == "bucket":
    host = request.getfixturevalue("emulator")
    folder = f"gs://{BUCKET}/compilation_test/jax_cache"
  else:
    folder = str(tmp_path)
  compilation.use_cache(folder, "runs/a", multi_process=False)
  step = lambda x: jnp.sin(x) * 3.0 + jnp.cumsum(x)  # a program of its own
  args = (jnp.arange(7.0),)
  _, _, first = compilation.compile_step(jax.jit(step), *args)
  jax.clear_caches()  # the in-memory cache; the persistent one stays
  compiled, _, second = compilation.compile_step(jax.jit(step), *args)
  assert (first, second) == (False, True)
  assert float(compiled(*args)[1]) == float(step(*args)[1])
  if where == "bucket":  # the entry JAX wrote, through gcsfs
    names = objects(host, "compilation_test/jax_cache/jit__lambda-")
    assert len(names) == 1 and names[0].endswith("-cache"), names
