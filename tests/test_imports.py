"""Every module imports on its own: an import circle fails here. Each module is imported with every
metavae module first removed from ``sys.modules`` (third-party packages stay loaded, which is what
makes this fast), so each one is the entry point of its own import graph."""
import importlib
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
