"""The shape of the code: one direction of imports between the parts of ism_jax, and short functions.

Both checks read the source with ``ast`` (nothing is imported), so imports inside functions count too.
"""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "ism_jax")
MAX_FUNCTION_LINES = 60
# Pallas kernel bodies: one long function per kernel reads best as it runs on the device.
KERNEL_FILES = ("ism_jax/attention/gpu_*.py", "ism_jax/attention/tpu_kernels.py")


def _part(module: str) -> str | None:
  """The part of ism_jax a dotted module name belongs to: ``ism_jax.data.pipeline`` -> ``data``."""
  names = module.split(".")
  return names[1] if names[0] == "ism_jax" and len(names) > 1 else None


def _imported_modules(path: str, module: str) -> set[str]:
  """Every module a file imports (absolute names; relative imports resolved against ``module``)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)  # `from ism_jax import workdir`
  return found


def _parts() -> set[str]:
  """The subpackages and top-level modules of ism_jax: ``masks``, ``model``, ``data``, ..."""
  names = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(PACKAGE, "*", "__init__.py"))}
  return names | {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "*.py"))} - {"__init__"}


def import_graph() -> dict[str, set[str]]:
  """Part -> the other parts it imports."""
  parts = _parts()
  graph: dict[str, set[str]] = {part: set() for part in parts}
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
    part = _part(module)
    if part is None:  # ism_jax/__init__.py re-exports the public names of every part
      continue
    imported = {_part(m) for m in _imported_modules(path, module)}
    graph[part].update((imported & parts) - {part})
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a path ``[a, b, ..., a]``, or ``None``."""
  state: dict[str, str] = {}

  def visit(node, path):
    state[node] = "open"
    for succ in sorted(graph.get(node, ())):
      if state.get(succ) == "open":
        return path[path.index(succ):] + [succ]
      if succ not in state:
        found = visit(succ, path + [succ])
        if found:
          return found
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_the_parts_of_ism_jax_import_each_other_in_one_direction():
  graph = import_graph()
  assert {"masks", "attention", "model", "data", "training", "inference", "convert"} <= set(graph)
  assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
  # The layering docs/DESIGN.md draws: inference and training share ism_jax.workdir, not each other.
  assert "training" not in graph["inference"] and "training" not in graph["workdir"]
  assert graph["masks"] == set()


def test_the_cycle_finder_finds_cycles():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_60_lines():
  exempt = {os.path.normpath(p) for pattern in KERNEL_FILES for p in glob.glob(os.path.join(REPO, pattern))}
  sources = [p for folder in ("ism_jax", "tests", "benchmarks", "scripts", "configs", "experiments")
             for p in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)]
  sources += glob.glob(os.path.join(REPO, "*.py"))
  long = []
  for path in sorted(set(sources) - exempt):
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, "functions over 60 lines: " + ", ".join(long)
