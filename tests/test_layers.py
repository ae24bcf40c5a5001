"""Modules point down (DESIGN.md): the core imports no learner and no hpo, learners import no hpo,
nothing below the runner imports it, and no two modules import each other, even through a chain
or from inside a function (where a cycle hides until the day it breaks an import)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pocketflow", "learners", "hpo", "nets")
TOP = ("pocketflow.runner", "pocketflow.cli", "pocketflow.benchmarks", "pocketflow.config_template")  # on top


def _modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> Optional[str]:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> Set[str]:
    """Our modules that ``path`` imports anywhere in its body (``from a import b``: a.b if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(filter(None, map(_resolve, names)))
    return found


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def _layer(module: str) -> int:
    if module.startswith(TOP):
        return 3
    if module.startswith("hpo"):
        return 2
    if module.startswith("learners"):
        return 1
    return 0  # the core: pocketflow's config, data, training, metrics, export, ... and the nets


def test_every_import_points_down():
    upward = [f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
              for module, targets in GRAPH.items() for target in sorted(targets) if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_walk_sees_the_packages():
    """The checks above would pass on an empty graph: make sure they look at the real one."""
    assert {"pocketflow.runner", "hpo.search", "learners.channel_pruning.graph", "nets.base"} <= set(GRAPH)
    assert "hpo.search" in GRAPH["pocketflow.runner"]  # an import inside a function counts
    assert "learners.channel_pruning.tf_ops" in GRAPH["learners.channel_pruning.graph"]


def test_config_and_help_do_not_start_tensorflow():
    """Reading a configuration or printing --help must not pay TensorFlow's start (seconds), and
    importing pocketflow sets tf.keras to Keras 2 before TensorFlow is imported, whatever the
    launching environment said (a `from tensorflow.keras import ...` included)."""
    import subprocess
    import sys

    probe = ("import sys; import pocketflow.config, pocketflow.cli; "
             "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; "
             "import tensorflow as tf; from tensorflow.keras import layers; "
             "assert layers.Dense.__module__.startswith('tf_keras'), layers.Dense.__module__; "
             "assert tf.keras.Model.__module__.startswith('tf_keras'), tf.keras.Model.__module__")
    root = Path(__file__).resolve().parent.parent
    environment = {"PATH": "/usr/bin:/bin", "TF_USE_LEGACY_KERAS": "0"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-X", "importtime", "main.py", "--help"], cwd=root, env=environment,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "--target-speedup" in shown.stdout
    assert "tensorflow" not in {line.split("|")[-1].strip().split(".")[0] for line in shown.stderr.splitlines()}
