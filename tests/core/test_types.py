"""eqco_jax.core.types: the type names the package shares are written once;
no module defines its own."""

import ast
import pathlib

from eqco_jax.core import types

PACKAGE = pathlib.Path(types.__file__).parents[1]


def test_no_module_defines_a_shared_type_name_again():
  shared = {"PyTree", "Dtype", "Metrics"}
  assert shared <= set(vars(types))
  again = []
  for path in PACKAGE.rglob("*.py"):
    if path == pathlib.Path(types.__file__):
      continue
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id in shared for t in node.targets):
        again.append(f"{path}:{node.lineno}")
  assert not again, again
