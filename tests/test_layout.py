"""The package layout: imports run one way, and no module imports in a cycle.

`textfusion_jax` (model, training, evaluation) may import `input_pipeline`
(data, files, errors); `input_pipeline` must never import `textfusion_jax`.
Read from the source with `ast`, so nothing is imported or executed. Also:
every config in configs/ names its command and only default.py's fields.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("textfusion_jax", "input_pipeline")


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
  """Project modules imported anywhere in `path` (lazy imports included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pkg import mod` imports pkg.mod when mod is a module.
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    found.update(n for n in names if n.split(".")[0] in PACKAGES)
  return found


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for package in PACKAGES
             for p in (ROOT / package).rglob("*.py")}
  return {name: {m for m in _imports(path) if m in modules and m != name}
          for name, path in modules.items()}


def test_input_pipeline_never_imports_textfusion_jax():
  offenders = sorted(f"{module} -> {target}"
                     for module, targets in _graph().items()
                     if module.startswith("input_pipeline")
                     for target in targets
                     if target.startswith("textfusion_jax"))
  assert not offenders, offenders


def test_no_import_cycles_between_modules():
  graph = _graph()
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      # A package's __init__ importing its own submodules is not a cycle.
      if node == nxt.rsplit(".", 1)[0] or nxt == node.rsplit(".", 1)[0]:
        continue
      if state.get(nxt) == 1:
        pytest.fail("import cycle: " + " -> ".join(
            path[path.index(nxt):] + [nxt]))
      if not state.get(nxt):
        visit(nxt, path + [nxt])
    state[node] = 2

  for module in sorted(graph):
    if not state.get(module):
      visit(module, [module])


def test_the_checks_see_a_reverse_import(tmp_path, monkeypatch):
  """The scanner finds `from textfusion_jax import x` inside a function."""
  module = tmp_path / "m.py"
  module.write_text("def f():\n  from textfusion_jax import image_io\n")
  assert "textfusion_jax.image_io" in _imports(module)


def _console_scripts() -> dict[str, str]:
  import tomllib  # pylint: disable=g-import-not-at-top
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  return project["scripts"]


def test_console_scripts_answer_help_with_their_flags():
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  scripts = _console_scripts()
  assert set(scripts) == {"textfusion-train", "textfusion-fuse",
                          "textfusion-evaluate", "textfusion-export",
                          "textfusion-embed-captions"}
  for script, target in scripts.items():
    module, function = target.split(":")
    # What the installed wrapper runs: import the module, call `function`.
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.argv[0] = {script!r}; "
         f"from {module} import {function}; {function}()", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (script, proc.stderr[-2000:])
    flags_listed = [l for l in proc.stdout.splitlines()
                    if l.startswith("  --")]
    assert len(flags_listed) >= 2, (script, proc.stdout)


def _flat_items(config, prefix: str = "") -> dict:
  items = {}
  for key, value in config.items():
    items.update(_flat_items(value, f"{prefix}{key}.")
                 if hasattr(value, "items") else {prefix + key: value})
  return items


def _flat_keys(config) -> set[str]:
  return set(_flat_items(config))


@pytest.mark.parametrize("path", sorted(
    p for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"),
                         ids=lambda p: p.stem)
def test_each_config_names_its_command_and_only_default_fields(path):
  """Variant configs override default's fields (a new field goes to
  configs/default.py, with its comment), and the docstring holds the
  command that runs the config."""
  # pylint: disable=g-import-not-at-top
  import importlib
  from configs import default
  module = importlib.import_module(f"configs.{path.stem}")
  assert f"--config configs/{path.name}" in (module.__doc__ or "")
  extra = _flat_keys(module.get_config()) ^ _flat_keys(default.get_config())
  assert not extra, f"{path.name}: fields not in default.py: {sorted(extra)}"


# sha256 of pretrained/textfusion-small-degraded/params.safetensors, the
# params the prompted bundle started from and was referenced against.
SECOND_STAGE_PARAMS_SHA256 = (
    "1118a8fbaff4b703065bb27e6223b891d3bfa95c84c93c7a29c744bc286ab479")


def test_the_prompted_bundle_records_its_configs_fields_and_start():
  """pretrained/textfusion-small-degraded-prompted records the config it was
  trained with: configs/real_pairs_degraded_prompted.py must still give it,
  from the same second stage, so its docstring's command reproduces it."""
  # pylint: disable=g-import-not-at-top
  import hashlib
  import json
  from configs import default
  from configs import real_pairs_degraded_prompted as prompted
  bundle = ROOT / "pretrained" / "textfusion-small-degraded-prompted"
  shipped = _flat_items(json.loads((bundle / "config.json").read_text()))
  ours = _flat_items(json.loads(prompted.get_config().to_json()))
  defaults = _flat_items(json.loads(default.get_config().to_json()))
  # The bundle's encoder is its own copy (text_encoder/) of the run's.
  assert shipped.pop("text.encoder") == "text_encoder"
  assert ours.pop("text.encoder") == "tiny-random"
  assert {k: ours.get(k) for k in shipped} == shipped
  # Fields added since keep their defaults (the old behaviour).
  assert {k: v for k, v in ours.items() if k not in shipped} == {
      k: defaults[k] for k in ours if k not in shipped}
  start = ROOT / prompted.SECOND_STAGE / "params.safetensors"
  assert hashlib.sha256(start.read_bytes()).hexdigest() == (
      SECOND_STAGE_PARAMS_SHA256), f"{start} is not the params it started from"
