"""Import the repository's stand-alone scripts (benchmarks/, scripts/) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``benchmarks/grocery_cv.py`` -> the module, registered under its file name (dataclasses
    look their module up in ``sys.modules``). Its folder goes on ``sys.path``, as when Python
    runs the script, so that it imports its neighbours the same way."""
    path = ROOT / relative
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
