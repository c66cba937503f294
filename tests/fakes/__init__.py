"""Fake gcloud, sbatch and srun (tests/fakes/bin) for running the launchers
here: ``fake_env`` gives the environment in which they replace the real tools.

The fakes emulate a Cloud TPU VM and a SLURM cluster whose workers or nodes
are this machine, each with ``devices_per_worker`` host CPU devices standing in
for its accelerators; see each fake's docstring for what it checks.
``local_wheels`` makes a wheel folder for ``tpu_pod.sh --setup --wheels``, and
``processes_with`` finds a worker's or task's process (to kill it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import zipfile

from helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "tests" / "fakes" / "bin"
sys.path.insert(0, str(BIN.parent))
from fakelib import free_port  # noqa: E402  (the fakes' own, for one rule)
TPU_NAME, ZONE = "fake-pod", "us-central2-b"


def fake_env(tmp_path, num_workers: int = 2, devices_per_worker: int = 4,
             provision: bool = True, base: dict | None = None,
             tpu_name: str = TPU_NAME, zone: str = ZONE,
             project: str | None = None) -> dict[str, str]:
  """This environment (or ``base``) with the fakes first on PATH.

  * gcloud: TPU VM ``tpu_name`` in ``zone`` (of ``project``: any project
    if None) with ``num_workers`` workers, homes under ``tmp_path/gcloud``. With
    ``provision``, each worker is as ``tpu_pod.sh --setup`` leaves it:
    ~/eqco-jax is this checkout (by links) whose .venv is this interpreter's
    environment. Workers' PATH: $HOME/.local/bin, the folder of ``uv`` if
    installed here (the image has it), /usr/local/bin:/usr/bin:/bin.
  * sbatch/srun: ``num_workers`` nodes.
  * ``python`` on PATH is this interpreter; JAX_PLATFORMS=cpu and XLA_FLAGS
    give a plain process ``devices_per_worker`` devices (gpu_host.sh,
    multinode.sh), the suite's other XLA flags stay (and pass to the fake
    workers and tasks as FAKE_XLA_FLAGS); PORT is free for
    local_processes.sh.
  """
  env = dict(os.environ if base is None else base)
  state = pathlib.Path(tmp_path) / "gcloud"
  tpu = state / zone / tpu_name
  tpu.mkdir(parents=True, exist_ok=True)
  (tpu / "tpu.json").write_text(json.dumps(dict(
      workers=num_workers, devices_per_worker=devices_per_worker,
      **({"project": project} if project else {}))))
  for w in range(num_workers):
    home = tpu / f"worker-{w}"
    home.mkdir(exist_ok=True)
    if provision:
      provision_worker(home)
  tools = state / "image-bin"
  tools.mkdir(exist_ok=True)
  uv = pathlib.Path(sys.executable).parent / "uv"
  if uv.exists() and not (tools / "uv").exists():
    (tools / "uv").symlink_to(uv)
  env.update(
      PATH=os.pathsep.join([str(BIN), os.path.dirname(sys.executable),
                            env.get("PATH", "/usr/bin:/bin")]),
      FAKE_GCLOUD_STATE=str(state),
      FAKE_TPU_WORKER_PATH=f"{tools}:/usr/local/bin:/usr/bin:/bin",
      FAKE_SLURM_NODES=str(num_workers),
      FAKE_SLURM_DEVICES_PER_NODE=str(devices_per_worker),
      JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
      XLA_FLAGS=xla_flags(devices_per_worker),
      FAKE_XLA_FLAGS=xla_flags(None),
      PORT=str(free_port()))
  return env


def provision_worker(home: pathlib.Path) -> None:
  """~/eqco-jax as after ``--setup``, made of links to this checkout."""
  checkout = home / "eqco-jax"
  checkout.mkdir(exist_ok=True)
  for name in ("eqco_jax", "configs", "launch", "constraints.txt"):
    if not (checkout / name).exists():
      (checkout / name).symlink_to(ROOT / name)
  if not (checkout / ".venv").exists():
    (checkout / ".venv").symlink_to(sys.prefix)


def worker_home(env: dict[str, str], worker: int, tpu_name: str = TPU_NAME,
                zone: str = ZONE) -> pathlib.Path:
  """The home folder of TPU VM worker ``worker``."""
  return pathlib.Path(env["FAKE_GCLOUD_STATE"]) / zone / tpu_name / \
      f"worker-{worker}"


def processes_with(variable: str, value: str, argument: str) -> list[int]:
  """Pids of python processes with ``variable=value`` in their environment
  and ``argument`` on their command line (a TPU worker, a SLURM task)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
      with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().decode(errors="replace").split("\0")
    except (OSError, ValueError):
      continue
    if ("python" in os.path.basename(argv[0]) and argument in argv
        and f"{variable}={value}" in environ):
      found.append(int(pid))
  return found


def _wheel(dist, folder: pathlib.Path, with_files: bool) -> None:
  """Writes ``dist`` as a wheel: its real METADATA, and its files or none."""
  name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
  info = f"{name}-{dist.version}.dist-info"
  entries = {f"{info}/METADATA": dist.read_text("METADATA").encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: eqco-jax tests"
                              b"\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
  for file in (dist.files or []) if with_files else []:
    parts = pathlib.PurePath(file).parts
    if parts[0] == ".." or "__pycache__" in parts or parts[-1] in (
        "RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "METADATA"):
      continue
    entries[str(file)] = pathlib.Path(dist.locate_file(file)).read_bytes()
  record = [f"{path},sha256=" + base64.urlsafe_b64encode(
      hashlib.sha256(data).digest()).rstrip(b"=").decode() + f",{len(data)}"
            for path, data in entries.items()]
  entries[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]).encode()
  with zipfile.ZipFile(folder / f"{name}-{dist.version}-py3-none-any.whl",
                       "w") as whl:
    for path, data in entries.items():
      whl.writestr(path, data)


def local_wheels(folder) -> pathlib.Path:
  """For ``tpu_pod.sh --setup --wheels=FOLDER`` without network: a wheel for
  every distribution installed here, with its real metadata (so the real
  dependency graph is resolved) but, to stay small, no files, except
  setuptools and wheel, which build eqco-jax; and libtpu, which jax[tpu]
  needs and a CPU machine lacks, as an empty wheel."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for dist in importlib.metadata.distributions():
    if dist.metadata["Name"] and dist.metadata["Name"] != "eqco-jax":
      _wheel(dist, folder, with_files=dist.metadata["Name"] in (
          "setuptools", "wheel"))
  jax_tpu = [r for r in importlib.metadata.requires("jax")
             if "libtpu" in r and 'extra == "tpu"' in r][0]
  version = re.search(r"==([\d.]+)", jax_tpu).group(1).rstrip(".")
  libtpu = folder / f"libtpu-{version}-py3-none-any.whl"
  with zipfile.ZipFile(libtpu, "w") as whl:
    info = f"libtpu-{version}.dist-info"
    whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: libtpu\n"
                 f"Version: {version}\n")
    whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true"
                 "\nTag: py3-none-any\n")
    whl.writestr(f"{info}/RECORD", "")
  return folder
