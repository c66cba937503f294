"""Fake gcloud, sbatch and srun (tests/fakes/bin) for running the launchers
here: ``fake_env`` gives the environment in which they replace the real tools.

The fakes emulate a Cloud TPU VM and a SLURM cluster whose workers or nodes
are this machine, each with ``devices_per_worker`` host CPU devices standing in
for its accelerators; see each fake's docstring for what it checks.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "tests" / "fakes" / "bin"
TPU_NAME, ZONE = "fake-pod", "us-central2-b"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


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
    multinode.sh); PORT is free for local_processes.sh.
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
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_worker}",
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
