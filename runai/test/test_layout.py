"""The shape of the package: what each layer may import, no import cycles, modules of one
job each. Read from the source (ast), so a violation fails here before it ships."""

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import runai

ROOT = Path(runai.__file__).parent
HEAVY = ("torch", "diffusers", "transformers", "safetensors")
# Twisted's transports: the core hears of connections only through its doors.
TRANSPORTS = ("twisted.internet.tcp", "twisted.internet.ssl", "twisted.internet.endpoints",
              "twisted.internet.protocol", "twisted.web", "twisted.protocols")
MAX_LINES = 420


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        if "test" in path.relative_to(ROOT).parts[:1]:
            continue
        yield ".".join(("runai",) + path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def imports(path, module, top_level_only=False):
    """Every module ``path`` imports (``from a import b`` counts as ``a.b`` and ``a``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class LayoutTests(SynchronousTestCase):
    def test_the_core_knows_no_door_no_transport_no_torch(self):
        for module, path in modules():
            if under(module, ("runai.core",)):
                bad = sorted(n for n in imports(path, module)
                             if under(n, HEAVY + TRANSPORTS + ("runai.doors", "runai.backends", "runai.engine")))
                self.assertEqual(bad, [], module)

    def test_a_door_runs_no_engine(self):
        for module, path in modules():
            if under(module, ("runai.doors",)):
                bad = sorted(n for n in imports(path, module)
                             if under(n, HEAVY + ("runai.engine", "runai.backends")))
                self.assertEqual(bad, [], module)

    def test_no_import_cycles(self):
        known = dict(modules())
        graph = {}
        for module, path in known.items():
            graph[module] = {n for n in imports(path, module, top_level_only=True) if n in known and n != module}
        state = {}

        def visit(module, stack):
            state[module] = "visiting"
            for target in sorted(graph[module]):
                if state.get(target) == "visiting":
                    self.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
                if target not in state:
                    visit(target, stack + [target])
            state[module] = "done"

        for module in sorted(graph):
            if module not in state:
                visit(module, [module])

    def test_modules_do_one_job(self):
        long = {module: n for module, path in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
        self.assertEqual(long, {})

    def test_each_module_names_its_tests(self):
        missing = [module for module, path in modules()
                   if path.name != "__init__.py" and "test-case-name:" not in path.read_text().split("\n", 1)[0]]
        self.assertEqual(missing, [])
