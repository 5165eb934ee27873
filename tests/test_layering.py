"""The import layering of docs/architecture.md: every module sits in one layer and imports only
from its own layer or those below; there is no import cycle (function-local imports count);
the model core imports nothing above it; configs never import the trainer."""

import ast
import glob
import os
import subprocess
import sys

import pytest
from conftest import REPO

# Bottom to top, as docs/architecture.md draws them. A new module is placed here first.
LAYERS = {
    "model": ["sharding", "attention", "quantization", "lora", "execution", "config", "rope",
              "model"],
    "base": ["fs", "lock", "cluster"],
    "data": ["data", "data.markov", "data.tokenizer", "data.records", "data.ratings",
             "data.corpus", "data.pipeline", "data.chat_format", "data.packing", "data.chat",
             "data.preference", "data.prompts"],
    "checkpoints": ["pretrained", "checkpoint"],
    "formats": ["convert", "convert.formats", "convert.hf", "convert.meta", "convert.native",
                "convert.manifest", "convert.core", "convert.peft"],
    "objectives": ["losses", "ppo", "step", "optim", "metrics"],
    "inference": ["loading", "generation", "inference", "evaluate", "reward", "rejection",
                  "gatt"],
    "tasks": ["tasks.base", "tasks.lm", "tasks.sft", "tasks.reward", "tasks.dpo", "tasks.ppo",
              "tasks"],
    "experiment": ["experiment"],
    "setup": ["setup", "state"],
    "programs": ["loop", "ppo_train", "train", "rounds", "aot"],
    "entry points": ["llamax", "cli", "cli.train", "cli.tokenizer", "cli.convert",
                     "cli.generate", "cli.eval", "cli.aot", "cli.reward", "cli.gatt"],
}  # fmt: skip
LEVEL = {name: i for i, names in enumerate(LAYERS.values()) for name in names}
# Inside the model core the order is strict: each imports only those before it.
CORE = LAYERS["model"]


def _modules() -> dict[str, str]:
    out = {}
    for path in glob.glob(os.path.join(REPO, "llamax", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.join(REPO, "llamax"))[:-3].replace(os.sep, ".")
        name = rel.removesuffix(".__init__") if rel != "__init__" else "llamax"
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: str, importer: str = "") -> set[str]:
    """The llamax modules a file imports, anywhere in it (names relative to `llamax.`), and the
    packages whose `__init__` those imports run (importing `llamax.convert.peft` runs
    `llamax/convert/__init__.py` first; from inside the package, its own `__init__` is already
    running or done)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from llamax import x` imports the module llamax.x when there is one (else a
            # name of the package llamax, which the resolution below falls back to).
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "llamax":
                found.add("llamax")
            elif name.startswith("llamax."):
                short = name.removeprefix("llamax.")
                while short and short not in MODULES:
                    short = short.rpartition(".")[0]
                found.add(short or "llamax")
    packages = set()
    for name in found:
        package = name.rpartition(".")[0]
        while package:
            if package in MODULES and not f"{importer}.".startswith(f"{package}."):
                packages.add(package)
            package = package.rpartition(".")[0]
    return found | packages


GRAPH = {name: _imports(path, name) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LEVEL), (
        f"not in LAYERS: {sorted(set(MODULES) - set(LEVEL))}; "
        f"gone: {sorted(set(LEVEL) - set(MODULES))}"
    )


def test_modules_import_only_their_layer_and_below():
    upward = [
        f"{name} ({list(LAYERS)[LEVEL[name]]}) imports {dep} ({list(LAYERS)[LEVEL[dep]]})"
        for name, deps in GRAPH.items()
        for dep in deps
        if LEVEL[dep] > LEVEL[name]
    ]
    assert not upward, upward


def test_the_model_core_imports_nothing_above_it():
    for i, name in enumerate(CORE):
        assert GRAPH[name] <= set(CORE[:i]), f"{name} imports {GRAPH[name] - set(CORE[:i])}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_a_cycle_through_a_package_init_is_found(monkeypatch):
    """Importing `llamax.convert.peft` runs `llamax/convert/__init__.py`, which imports the
    converter: a module the converter imports may not import `convert.peft` (pretrained did,
    through `read_adapters`, before `llamax.loading` took that over)."""
    imports = _imports(MODULES["loading"], "loading")
    assert {"convert.peft", "convert"} <= imports
    monkeypatch.setitem(GRAPH, "pretrained", GRAPH["pretrained"] | _imports_of("convert.peft"))
    with pytest.raises(AssertionError, match="import cycle: .*convert.*pretrained"):
        test_no_import_cycle()


def _imports_of(name: str) -> set[str]:
    return {name, *(p for p in [name.rpartition(".")[0]] if p in MODULES)}


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "rope", GRAPH["rope"] | {"model"})
    with pytest.raises(AssertionError, match="import cycle: .*model -> rope -> model"):
        test_no_import_cycle()


def test_configs_never_import_the_trainer():
    code = (
        "import glob, importlib.util, sys\n"
        "for path in sorted(glob.glob('configs/*.py')):\n"
        "    spec = importlib.util.spec_from_file_location('c', path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.get_config()\n"
        "print([m for m in ('llamax.train', 'llamax.setup') if m in sys.modules])\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]"
