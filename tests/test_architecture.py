"""Import rules: the core never pulls in Qt; heavy libraries load only where used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()


def test_import_linter_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_the_core_and_its_service_leaves_qt_out():
    out = run_python("import sys, ryzanstein, ryzanstein.cli, ryzanstein.service.app, ryzanstein.engine.generate;"
                     "print([m for m in ('PySide6', 'pyqtgraph', 'ryzanstein_desktop') if m in sys.modules])")
    assert out == "[]"


def test_cli_help_does_not_import_torch():
    out = run_python("import sys, ryzanstein.cli; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out == "False False"
