"""eqco_jax.program.torchvision.reading: files of other frameworks in
(``config.init_from``), local, on GCS (a local emulator) or at an https URL
(a local server), checked against torchvision's own ResNets."""

import argparse
import functools
import http.server
import os
import re
import threading
import time
import types

import jax
import numpy as np
import pytest
import torch
from safetensors import numpy as safetensors_numpy
from safetensors import torch as safetensors_torch

import fakes
import gcs_emulator
import torch_models
from helpers import default_config
from eqco_jax.core import config as config_lib
from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError
from eqco_jax.core.training import builders
from eqco_jax.program.files import storage
from eqco_jax.program.torchvision import layout
from eqco_jax.program.torchvision import reading


def test_official_checkpoint_wrappers_are_stripped_and_heads_ignored(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=3)
  state = model.state_dict()
  moco = {"epoch": 200, "arch": "resnet18", "state_dict": {
      **{f"module.encoder_q.{k}": v for k, v in state.items()
         if not k.startswith("fc.")},
      "module.encoder_q.fc.0.weight": torch.zeros(2048, 512),
      "module.encoder_q.fc.2.weight": torch.zeros(128, 2048),
      **{f"module.encoder_k.{k}": v + 1 for k, v in state.items()},
      "module.queue": torch.zeros(128, 16)}}
  path = str(tmp_path / "checkpoint_0199.pth.tar")
  torch.save(moco, path)
  read = reading.read_backbone_state(path)
  expected = torch_models.state_arrays(model)
  assert list(read) == list(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)


@pytest.mark.parametrize("model, width, message", [
    ("resnet50", 64, "has 'layer1.0.conv1.weight' of shape (64, 64, 3, 3) "
     "where the config's resnet50 needs (64, 64, 1, 1)"),
    ("resnet18", 16, "has 'conv1.weight' of shape (64, 3, 7, 7) where the "
     "config's resnet18 needs (16, 3, 7, 7)"),
    ("resnet10", 64, "has 'layer1.1.conv1.weight', which the config's "
     "resnet10 does not have"),
])
def test_init_from_another_architecture_names_the_key(tmp_path, model, width,
                                                      message):
  path = str(tmp_path / "r18.safetensors")
  state = torch_models.state_arrays(torch_models.random_resnet("resnet18"))
  safetensors_numpy.save_file(state, path)
  config = default_config(model=model, width=width)
  with pytest.raises(UserError) as error:
    reading.load_backbone(path, reading.backbone_shapes(builders.backbone_of(config), config.image_size), model)
  assert str(error.value).startswith(f"config.init_from={path} {message}; ")


def test_init_from_must_be_a_file(tmp_path):
  config = config_lib.default_config()
  config.init_from = str(tmp_path / "none.pth")
  with pytest.raises(UserError, match=r"config.init_from='.*none.pth' is not "
                     "allowed: use '', or the path, gs:// or https:// URL of "
                     "a ResNet .pth or .safetensors."):
    config_lib.validate(config, 1)
  # URLs are checked when the program reads them.
  for url in ("gs://eqco-runs/r18.pth", "https://example.com/r18.pth"):
    config.init_from = url
    config_lib.validate(config, 1)


def test_init_from_sets_online_and_momentum_backbones(tmp_path):
  model = torch_models.random_resnet("resnet18", seed=4)
  path = str(tmp_path / "supervised.pth")
  torch.save(model.state_dict(), path)
  config = default_config(model="resnet18", image_size=32, head_hidden_dim=32,
                          head_out_dim=16, init_from=path)
  mesh = sharding.make_mesh()
  run = builders.build_pretraining(config, steps_per_epoch=10)
  # The initial state's structure, filled with 3s (compiles nothing).
  shapes = jax.eval_shape(lambda: run.initial_state(mesh))
  state = jax.tree.map(
      lambda s: jax.device_put(np.full(s.shape, 3, s.dtype),
                               sharding.replicated(mesh)), shapes)
  head = jax.tree.map(np.asarray, state.params["head"])
  state = reading.initialise_backbone(state, config)
  wanted = layout.from_torchvision(
      torch_models.state_arrays(model))
  for params, stats in ((state.params, state.batch_stats),
                        (state.momentum_params, state.momentum_batch_stats)):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, params["backbone"]),
                 wanted["params"])
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, stats["backbone"]),
                 wanted["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, state.params["head"]), head)
  assert state.params["backbone"]["conv1"]["kernel"].sharding == (
      sharding.replicated(mesh))


# ----------------------------------------------- other frameworks' layouts.


@pytest.fixture(scope="module")
def resnet18():
  """A random torchvision ResNet-18 (one for the module's tests)."""
  return torch_models.random_resnet("resnet18", seed=8)


def _renamed(state: dict, prefix: str, shift: int = 0) -> dict:
  """``state``'s keys behind ``prefix``, values + ``shift`` (a momentum copy
  that must not be taken for the backbone)."""
  return {f"{prefix}{k}": v + shift for k, v in state.items()}


def _head(prefix: str) -> dict:
  return {f"{prefix}0.weight": torch.ones(16, 512),
          f"{prefix}0.bias": torch.ones(16)}


# The checkpoints as each project writes them, from a torchvision
# state_dict (fc included); the file type each is written as.
LAYOUTS = {
    "torchvision": (lambda s: s, "safetensors"),
    "torchvision_reference": (lambda s: {"model": s, "epoch": 89}, "pth"),
    # timm's train.py: torchvision's keys, an EMA copy beside them.
    "timm": (lambda s: {"epoch": 99, "arch": "resnet18", "state_dict": s,
                        "state_dict_ema": _renamed(s, "", 1)}, "pth"),
    "moco_v2": (lambda s: {"epoch": 200, "arch": "resnet18", "state_dict": {
        **_renamed(s, "module.encoder_q."), **_head("module.encoder_q.fc."),
        **_renamed(s, "module.encoder_k.", 1),
        "module.queue": torch.zeros(128, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}, "pth"),
    "moco_v3": (lambda s: {"epoch": 300, "arch": "resnet18", "state_dict": {
        **_renamed(s, "module.base_encoder."),
        **_head("module.base_encoder.fc."),
        **_renamed(s, "module.momentum_encoder.", 1),
        **_head("module.predictor.")}}, "pth"),
    "solo_learn": (lambda s: {
        "epoch": 399, "global_step": 1000,
        "pytorch-lightning_version": "2.0.0", "state_dict": {
            **_renamed(s, "backbone."), **_head("projector."),
            **_renamed(s, "momentum_backbone.", 1),
            **_head("momentum_projector."), **_head("classifier.")}}, "pth"),
    "mmselfsup": (lambda s: {"meta": {"epoch": 200}, "state_dict": {
        **_renamed(s, "backbone."), **_head("neck.mlp."),
        **_head("head.predictor."),
        **_renamed(s, "target_net.module.0.", 1),
        "target_net.steps": torch.tensor(5)}}, "pth"),
    "vissl": (lambda s: {"phase_idx": 104, "classy_state_dict": {
        "base_model": {"model": {
            "trunk": _renamed(s, "_feature_blocks."),
            "heads": _head("0.clf.")}}}}, "pth"),
    "vissl_flat": (lambda s: {**_renamed(s, "trunk._feature_blocks."),
                              **_head("heads.0.clf.")}, "safetensors"),
}


def assert_same_state(read: dict, state: dict) -> None:
  """The same keys (safetensors keeps no order) and arrays."""
  assert sorted(read) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)


def write_layout(folder, name: str, model) -> str:
  """``model``'s weights in the layout ``name``, as a file in ``folder``."""
  make, kind = LAYOUTS[name]
  checkpoint = make(model.state_dict())
  path = str(folder / f"{name}.{kind}")
  if kind == "safetensors":
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in checkpoint.items()}, path)
  else:
    torch.save(checkpoint, path)
  return path


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_frameworks_layout_reads_as_torchvisions_keys(tmp_path, name,
                                                           resnet18):
  path = write_layout(tmp_path, name, resnet18)
  assert_same_state(reading.read_backbone_state(path),
                    torch_models.state_arrays(resnet18))


def test_vissl_checkpoint_computes_torchvisions_features(tmp_path, resnet18):
  path = write_layout(tmp_path, "vissl", resnet18)
  assert reading.file_architecture(path) == dict(
      model="resnet18", width=64, small_image_stem=False)
  config = default_config(model="resnet18", image_size=32)
  variables = reading.load_backbone(
      path, reading.backbone_shapes(builders.backbone_of(config), config.image_size), "resnet18")
  images = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(
      np.float32)
  torch_models.assert_relative(
      torch_models.jax_features(config, variables, images),
      torch_models.features(resnet18, images))


def test_a_file_torch_cannot_read_safely_is_refused_in_one_sentence(
    tmp_path):
  page = tmp_path / "page.pth"
  page.write_bytes(b"<html>Sign in to download</html>")
  pickled = tmp_path / "train_checkpoint.pth"  # as timm's train.py
  torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, pickled)
  for path, reason in ((page, "UnpicklingError: "),
                       (pickled, "UnpicklingError: Unsupported global: "
                        "GLOBAL argparse.Namespace")):
    with pytest.raises(UserError) as error:
      reading.read_backbone_state(str(path))
    message = str(error.value)
    assert message.startswith(f"cannot read config.init_from={path} with "
                              f"torch.load(weights_only=True) ({reason}")
    assert message.endswith("); save the state_dict alone (torch.save("
                            "checkpoint['state_dict'], ...)), or check the "
                            "file.")
    assert "\n" not in message and "weights_only` set to `False" not in (
        message)


# ----------------------------------------------------------- gs:// and https.


def small_checkpoint() -> tuple[bytes, dict]:
  """A safetensors ResNet-18 state (random numbers: only the keys and
  shapes matter here) and its arrays."""
  shapes = layout.torchvision_shapes(reading.backbone_shapes(
      builders.backbone_of(default_config(model="resnet18")), 32))
  rng = np.random.default_rng(0)
  state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()
           if not k.endswith("num_batches_tracked")}
  return safetensors_numpy.save(state), state


def test_init_from_reads_gs_urls(emulator):
  data, state = small_checkpoint()
  gcs_emulator.write_object(emulator, "init_from/r18.safetensors", data)
  url = f"gs://{gcs_emulator.BUCKET}/init_from/r18.safetensors"
  assert_same_state(reading.read_backbone_state(url), state)
  missing = f"gs://{gcs_emulator.BUCKET}/init_from/none.pth"
  with pytest.raises(UserError, match=f"^config.init_from='{missing}' is not "
                     "a file; give the path, gs:// or https:// URL of a "
                     r"ResNet .pth or .safetensors.$"):
    reading.read_backbone_state(missing)


class _Files(http.server.SimpleHTTPRequestHandler):
  """Serves a folder; counts the GETs; ``/short/...`` promises more bytes
  than it sends (a download cut off); ``/trickle/...`` sends a byte every
  0.1 s."""
  gets = 0

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).gets += 1
    if self.path.startswith("/trickle/"):
      self.send_response(200)
      self.send_header("Content-Length", "100000")
      self.end_headers()
      try:
        for _ in range(600):
          self.wfile.write(b"x")
          self.wfile.flush()
          time.sleep(0.1)
      except OSError:  # the client gave up
        pass
      self.close_connection = True
      return
    if self.path.startswith("/short/"):
      self.send_response(200)
      self.send_header("Content-Length", "100000")
      self.end_headers()
      self.wfile.write(b"x" * 100)
      self.wfile.flush()
      self.close_connection = True
      return
    super().do_GET()

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def web_server(tmp_path):
  """``(base URL, folder it serves, server, handler class)`` on
  127.0.0.1."""
  folder = tmp_path / "www"
  folder.mkdir()
  handler = type("Files", (_Files,), {"gets": 0})
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
  thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                            daemon=True)
  thread.start()
  try:
    yield (f"http://127.0.0.1:{server.server_address[1]}", folder, server,
           handler)
  finally:
    server.shutdown()
    server.server_close()


def test_init_from_downloads_a_url_once_into_the_cache(
    web_server, tmp_path, monkeypatch):
  base, folder, server, handler = web_server
  cache = tmp_path / "cache"
  monkeypatch.setenv(storage.DOWNLOAD_CACHE_ENV, str(cache))
  data, state = small_checkpoint()
  (folder / "r18.safetensors").write_bytes(data)
  url = f"{base}/r18.safetensors"
  assert_same_state(reading.read_backbone_state(url), state)
  copy = storage.download_target(url, storage.path(cache))
  assert copy.name == "r18.safetensors" and copy.read_bytes() == data
  assert os.listdir(copy.parent) == ["r18.safetensors"]  # no partial file
  server.shutdown()  # the second read uses the copy
  server.server_close()
  assert_same_state(reading.read_backbone_state(url), state)
  assert handler.gets == 1


def test_a_failed_download_is_one_sentence_and_leaves_no_file(
    web_server, tmp_path):
  base = web_server[0]
  cache = storage.path(tmp_path / "cache")
  start = time.monotonic()
  cases = (
      (f"{base}/missing.pth", "HTTP 404 File not found"),
      (f"{base}/short/r18.pth", "ConnectionError: the answer ended after "
       "100 of 100000 bytes"),
      (f"http://127.0.0.1:{fakes.free_port()}/r18.pth",
       "ConnectionRefusedError: [Errno 111] Connection refused"))
  for url, reason in cases:
    with pytest.raises(UserError) as error:
      reading.read_backbone_state(url, cache)
    assert str(error.value) == (
        f"cannot download config.init_from={url} ({reason}); check the URL "
        "and this machine's network, or download the file by hand and give "
        "its local path.")
  assert time.monotonic() - start < 30
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_trickling_download_is_given_up_in_one_sentence_within_its_window(
    web_server, tmp_path, monkeypatch):
  """A server that sends a byte now and then is never silent for the
  timeout: with the shipped SLOW_BYTES and SLOW_WINDOW_SECS (10 kB in 30
  s), its byte every 3 s of the program's clock (which runs 30
  times as fast as the server's here): given up at the first byte after
  30 s, within 60 s whatever the pace (a byte at least every timeout), in
  one sentence, leaving no file."""
  real, start = time.monotonic, time.monotonic()
  clock = lambda: start + 30 * (real() - start)
  monkeypatch.setattr(storage, "time", types.SimpleNamespace(monotonic=clock))
  url = f"{web_server[0]}/trickle/r18.pth"
  with pytest.raises(UserError) as error:
    reading.read_backbone_state(url, storage.path(tmp_path / "cache"))
  assert storage.SLOW_WINDOW_SECS < clock() - start < (
      storage.SLOW_WINDOW_SECS + reading.DOWNLOAD_TIMEOUT_SECS)
  message = str(error.value)
  assert re.fullmatch(
      rf"cannot download config\.init_from={re.escape(url)} \(ConnectionError:"
      r" the server sent \d+ bytes in the last 30 s, under 10000 \(a "
      r"download that slow is given up\)\); check the URL [^\n]*\.", message)
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
