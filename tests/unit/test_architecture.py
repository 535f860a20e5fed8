"""The architecture contracts of pyproject.toml (`lint-imports`): kept by the code, and broken by an import that
crosses a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's packages, not the installed ones
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_code_keeps_every_contract() -> None:
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_import_across_a_layer_breaks_the_contracts(tmp_path: Path) -> None:
    for name in ("retriever", "ray_jobs"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    lazy_imports = {  # inside functions: import-linter sees them too
        "index/base.py": "from retriever.evaluation import metrics",  # the index reading the evaluation
        "report/ranking.py": "from retriever.sweep import run",  # the report calling back into the sweep
    }
    for module, statement in lazy_imports.items():
        with (tmp_path / "retriever" / module).open("a") as source:
            source.write(f"\n\ndef _crossing():\n    {statement}\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "0 kept, 3 broken" in result.stdout
    assert "retriever.index.base -> retriever.evaluation.metrics" in result.stdout
    assert "retriever.report.ranking -> retriever.sweep.run" in result.stdout
    assert "- .report -> .sweep (1 import)" in result.stdout  # the circle it closes


def test_the_index_imports_without_torch() -> None:
    """The index reads encodings through numpy and pyarrow only: importing it loads neither torch nor transformers
    (`retriever.encoding` imports its modules on first use)."""
    code = "import sys, retriever.index; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
