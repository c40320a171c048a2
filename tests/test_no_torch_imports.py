"""`index` and `service` must import without torch, timm or transformers (DESIGN.md: one direction of
dependence). Each import runs in a subprocess where importing any of them raises ImportError."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'timm', 'transformers', 'torchvision'}:
            raise ImportError(f'{name} is blocked: index/service must not import it')
        return None
sys.meta_path.insert(0, _Block())
"""


def _modules(package: str) -> list[str]:
    folder = ROOT / package
    return [package] + [m.name for m in pkgutil.walk_packages([str(folder)], prefix=f"{package}.")]


@pytest.mark.parametrize("module", _modules("index") + _modules("service"))
def test_module_imports_without_torch(module: str) -> None:
    code = BLOCKER + f"import {module}\nassert 'torch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_blocker_really_blocks_torch() -> None:
    """The check above could pass vacuously if the blocker did nothing: prove it refuses torch."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import torch\n"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "blocked" in result.stderr


RAY_MODULE = "index.engines.ray_engine"
"""The only module that imports ray (`retina-index build --engine ray`, the `cluster` extra)."""


def test_only_the_ray_engine_imports_ray() -> None:
    """Every module of index and service but the Ray engine imports with ray blocked, and none of them (the
    build, its CLI and the service among them) loads ray as a side effect."""
    modules = [m for m in _modules("index") + _modules("service") if m != RAY_MODULE]
    assert "index.build" in modules and "index.cli" in modules and "service.app" in modules
    blocker = BLOCKER.replace("{'torch', 'timm', 'transformers', 'torchvision'}", "{'ray'}")
    code = blocker + "".join(f"import {m}\n" for m in modules) + "assert 'ray' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
