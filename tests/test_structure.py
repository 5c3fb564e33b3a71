"""The code's structure, read from its imports (ast, nothing is run): no import circle, no tool
importing the trainer, no import hidden in a function to dodge a circle, the bottom layer
(models, losses, sharding, grad_cache) importing nothing above it, and every evaluator kind
with the interface the runner dispatches through."""

import ast
import os

import pytest

from rils_jax.evals import runner

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'rils_jax')
BOTTOM = ('rils_jax.models', 'rils_jax.losses', 'rils_jax.sharding', 'rils_jax.grad_cache')
# Imported inside a function on purpose: seconds of start-up, needed by TFDS inputs only.
# wandb is optional: imported only when config.wandb.mode turns it on. matplotlib: only the
# report at the end of a run draws.
LAZY_FOR_START_UP = {'tensorflow_datasets', 'wandb', 'matplotlib'}


def _modules():
  """module name -> (rils_jax modules it imports, modules imported inside functions)."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      module = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
      module = module.removesuffix('.__init__')
      tree = ast.parse(open(path, encoding='utf-8').read())
      imports, nested = set(), set()
      for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
          names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        imports.update(n for n in names if n.startswith('rils_jax'))
      for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for node in ast.walk(function):
            if isinstance(node, ast.Import):
              nested.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
              nested.add(node.module or '')
      out[module] = (imports, nested)
  known = set(out)
  return {m: ({i for i in imports if i in known and i != m}, nested)
          for m, (imports, nested) in out.items()}


MODULES = _modules()


def test_the_import_graph_has_no_circle():
  graph = {m: imports for m, (imports, _) in MODULES.items()}
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        raise AssertionError('import circle: ' + ' -> '.join(path + [module, dep]))
      if dep not in state:
        visit(dep, path + [module])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  assert len(graph) > 40  # The walk found the package.


# Commands that drive whole training runs (rils_jax.compare trains one run per variant).
TRAINER_DRIVERS = ('rils_jax.compare',)


def test_no_module_imports_the_trainer():
  importers = [m for m, (imports, _) in MODULES.items()
               if 'rils_jax.main' in imports and m not in TRAINER_DRIVERS]
  assert not importers, importers


def test_imports_inside_functions_are_only_for_start_up_time():
  for module, (_, nested) in MODULES.items():
    assert nested <= LAZY_FOR_START_UP, (module, nested - LAZY_FOR_START_UP)


def test_the_bottom_layer_imports_nothing_above_it():
  for module, (imports, _) in MODULES.items():
    if module.startswith(BOTTOM):
      above = {i for i in imports if not i.startswith(BOTTOM)}
      assert not above, (module, above)


@pytest.mark.parametrize('kind', sorted(runner.KINDS))
def test_every_evaluator_kind_owns_defaults_checks_and_run(kind):
  module = runner.KINDS[kind]
  assert isinstance(module.DEFAULTS, dict) and callable(module.check_settings)
  assert callable(module.run) and set(module.DATASETS.values()) <= {'images', 'captions'}
  assert set(module.DATASETS) <= set(module.DEFAULTS)
