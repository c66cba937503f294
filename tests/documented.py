"""The commands README.md, docs/ and the launchers' headers promise, as a
user types them, and the sandbox the tests run them in.

``documented_commands()`` reads every fenced ``bash`` block of the README and
of docs/*.md, and the usage lines at the top of ``launch/*`` (continuation lines joined,
optional ``[...]`` parts dropped). A sandbox is an empty directory that
links the checkout's configs, launchers, benchmarks and experiments, so that
relative paths in the commands (``configs/...``, ``runs/...``) work and
nothing is written into the checkout.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import helpers
from helpers import ROOT

LINKED = ("configs", "launch", "benchmarks", "experiments", "eqco_jax",
          "constraints.txt", "setup.cfg", "pyproject.toml", "README.md")


def _joined(lines: list[str]) -> list[str]:
  """Lines with trailing-backslash continuations joined."""
  commands, current = [], ""
  for line in lines:
    line = line.strip()
    if line.endswith("\\"):
      current += line[:-1].strip() + " "
      continue
    current += re.sub(r"\s+#.*$", "", line)  # a trailing comment
    if current and not current.startswith("#"):
      commands.append(re.sub(r"\s+", " ", current).strip())
    current = ""
  return commands


def drop_optional(command: str) -> str:
  """``cmd [--a=B] [-- --c ...]`` -> ``cmd``: what a user types at least."""
  while True:  # innermost first: [--setup [--python=P]] -> ''
    shorter = re.sub(r"\s+\[-[^\[\]]*\]", "", command)
    if shorter == command:
      return command.strip()
    command = shorter


def documentation() -> list[pathlib.Path]:
  """README.md and the pages of docs/."""
  return [pathlib.Path(ROOT, "README.md"),
          *sorted(pathlib.Path(ROOT, "docs").glob("*.md"))]


def fenced_blocks(path: pathlib.Path, *languages: str) -> list[str]:
  """The fenced code blocks of ``path`` in one of ``languages``."""
  names = "|".join(map(re.escape, languages))
  return re.findall(rf"^```(?:{names})\n(.*?)^```", path.read_text(),
                    flags=re.M | re.S)


def readme_commands() -> list[str]:
  return [c for path in documentation()
          for block in fenced_blocks(path, "bash", "sh", "shell")
          for c in _joined(block.splitlines())]


USAGE_START = re.compile(r"#\s{3,}(launch/|bash |sbatch |python )")


def launcher_commands() -> list[str]:
  """The usage lines of each launcher's leading comment block: lines
  indented by three or more spaces that start a command, and their
  backslash continuations."""
  commands = []
  for path in sorted(pathlib.Path(ROOT, "launch").iterdir()):
    usage, continuing = [], False
    for line in path.read_text().splitlines()[1:]:
      if not line.startswith("#"):
        break
      if continuing or USAGE_START.match(line):
        usage.append(line[1:])
        continuing = line.rstrip().endswith("\\")
    commands += _joined(usage)
  return commands


def documented_commands() -> list[str]:
  return readme_commands() + launcher_commands()


def documented(pattern: str) -> str:
  """The one documented command that ``pattern`` matches (optional parts
  dropped); fails unless exactly one does."""
  found = [command for command in map(drop_optional, documented_commands())
           if re.fullmatch(pattern, command)]
  assert len(found) == 1, (pattern, found)
  return found[0]


def usage_line(pattern: str, workdir, **replace: str) -> list[str]:
  """A launcher header's usage line, as typed, with its workdir (a path of
  the reader's cluster: /shared/..., gs://BUCKET/...) made ``workdir`` and
  any other ``replace``ments, split into argv."""
  command = documented(pattern)
  command = re.sub(r"(--workdir=|slurm\.sbatch \S+ )(\S+)",
                   lambda m: m.group(1) + str(workdir), command)
  for old, new in replace.items():
    command = command.replace(old, new, 1)
  return shlex.split(command)


# The launchers' usage lines name the ImageNet recipe; the tests run them
# with the quick start's tiny variant instead, with SHARED_RUN appended, so
# that they can be held to the session's 1 x 8 run of it
# (conftest.eight_device_run, itself gpu_host.sh's usage line). Two reasons:
# a TFDS split is divided between the processes (a 2 x 4 run of ImageNet sees
# other batches than a 1 x 8 one), and with the ImageNet recipe's ResNet-18 at
# these tiny sizes the 2 x 4 and 1 x 8 optimizer states differ by about 5%
# after 4 steps (parameters by 1e-4), more than the reassociation noise the
# quick start shows (README, "not exercised").
LAUNCHER_RECIPE = {
    "configs/simo.py:imagenet_r50_large": "configs/quickstart.py:tiny",
    "configs/simo.py:imagenet_r50": "configs/quickstart.py:tiny"}


def make_sandbox(path: pathlib.Path) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  for name in LINKED:
    link = path / name
    if not link.exists():
      link.symlink_to(os.path.join(ROOT, name))
  return path


def _shell_env(env: dict | None) -> dict:
  env = dict(os.environ if env is None else env)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
  return env


def shell(command: str, cwd: pathlib.Path, *, env: dict | None = None,
          timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs ``command`` with bash in ``cwd``, the test's Python first on PATH."""
  return subprocess.run(["bash", "-c", command], cwd=cwd,
                        env=_shell_env(env), capture_output=True, text=True,
                        timeout=timeout)


def start_shell(command: str, cwd: pathlib.Path, *,
                env: dict | None = None) -> subprocess.Popen:
  """Starts ``command`` as :func:`shell` runs it, in the background, SIGINT
  as typed in a terminal (bash runs a lone command in its own process)."""
  helpers.sigint_reaches_children()
  return subprocess.Popen(["bash", "-c", command], cwd=cwd,
                          env=_shell_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
