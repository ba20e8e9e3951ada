"""Every module imports on its own: an import circle fails here. Each module is imported with every
metavae module first removed from ``sys.modules`` (third-party packages stay loaded, which is what
makes this fast), so each one is the entry point of its own import graph."""
import importlib
import importlib.util
import pkgutil
import sys

import metavae

MODULES = sorted(m.name for m in pkgutil.walk_packages(metavae.__path__, "metavae."))


def test_every_module_imports_alone():
    saved = {k: v for k, v in sys.modules.items() if k == "metavae" or k.startswith("metavae.")}
    failures = []
    try:
        for name in ["metavae"] + MODULES:
            for k in [k for k in sys.modules if k == "metavae" or k.startswith("metavae.")]:
                del sys.modules[k]
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001  (the test reports every failure, not the first)
                failures.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        for k in [k for k in sys.modules if k == "metavae" or k.startswith("metavae.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert not failures, "\n".join(failures)
    assert len(MODULES) > 30


LIBRARY = [m for m in MODULES if not m.startswith("metavae.paper")]


def test_the_library_never_imports_the_paper():
    """`metavae` (data, nets, models, objectives, training, own-data commands) stands without
    `metavae.paper`: no library module names it in an import, and importing every library module
    (a fresh interpreter) loads none of it. The paper reaches the CLI and the registry only through
    entry points (`metavae.commands`, `metavae.models`)."""
    import ast
    import subprocess
    import textwrap

    offenders = []
    for name in LIBRARY:
        path = importlib.util.find_spec(name).origin
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                full = ".".join(base + ([node.module] if node.module else []))
                targets = [full] + [f"{full}.{a.name}" for a in node.names]
            if any(t == "metavae.paper" or t.startswith("metavae.paper.") for t in targets):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"library modules importing metavae.paper: {offenders}"
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {LIBRARY!r}:
            importlib.import_module(name)
            assert not any(k.startswith("metavae.paper") for k in sys.modules), name
        import torch
        from metavae.models import make_model, save_model, load
        save_model(make_model("metavae", event_shape=(3,), n_distributions=2), "m.pt")
        load("m.pt")
        assert not any(k.startswith("metavae.paper") for k in sys.modules), "load"
    """)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(LIBRARY) > 25


def test_a_paper_kind_loads_through_its_entry_point(tmp_path):
    """A model file of a kind the paper registers loads in a fresh interpreter that never imported
    the paper: `load` finds the kind through the ``metavae.models`` entry point."""
    import subprocess

    from metavae.paper.models import build_compiled_inference
    from metavae.paper.models.standardize import StandardizeOnContext
    from metavae.models import save_model

    save_model(build_compiled_inference(2, z_dim=1, hidden_widths=(8,), summary_widths=(8,), preprocess=StandardizeOnContext()),
               tmp_path / "m.pt")
    code = "from metavae.models import load; m = load('m.pt'); print(type(m.preprocess).__name__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "StandardizeOnContext"


def _imports(name: str, known: set) -> set:
    """The metavae modules ``name`` imports anywhere in its text (inside functions too)."""
    import ast

    path = importlib.util.find_spec(name).origin
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            full = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{full}.{a.name}" if f"{full}.{a.name}" in known else full for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_circle_runs_through_the_library():
    """No library module imports one that imports it back, even inside a function (a circle that
    only works because an import was moved late): saving reaches the registry through `models.files`,
    which imports no model, the library's kinds register in `models.kinds`, and data and training
    share `devices`."""
    known = set(MODULES) | {"metavae"}
    graph = {m: _imports(m, known) for m in known}

    def reaches(start: str) -> set:
        seen, todo = set(), [start]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    circles = sorted(m for m in known if not m.startswith("metavae.paper") and m in reaches(m))
    assert not circles, f"modules that import themselves back: {circles}"
