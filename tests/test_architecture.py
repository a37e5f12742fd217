"""The package's layers import only downward (docs/ARCHITECTURE.md), and the estimator imports no torch.

Every ``import`` in ``src/lorafit`` — at module level or inside a function — is read from the source (AST), so a
lazy import that runs upward fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "lorafit"

# Lowest first. A unit may import units of lower tiers and its own modules, nothing else.
TIERS = [
    {"errors"},
    {"fsutil", "targets", "architectures"},
    {"options", "dtypes", "_compat"},
    {"config", "kernels", "linearized"},
    {"models"},
    {"memory", "lora", "data"},
    {"patches"},
    {"train"},
    {"eval", "measure"},
    {"cli"},
    {"__main__"},
]
TIER = {unit: i for i, units in enumerate(TIERS) for unit in units}
# The estimator answers without torch: lorafit estimate / plan must start in well under a second.
TORCH_FREE = {"errors", "fsutil", "targets", "architectures", "options", "dtypes", "config", "memory"}
HEAVY = {"torch", "transformers", "numpy", "peft", "safetensors", "datasets", "matplotlib"}


def unit_of(module: str) -> str:
    """``lorafit.kernels.dropout`` → ``kernels``; ``lorafit`` (the package, which re-exports errors) → ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; ``from lorafit import x`` names ``lorafit.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lorafit":
                found += [(node.lineno, f"lorafit.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_tier():
    units = {unit_of(module_name(p)) for p in MODULES}
    assert units <= set(TIER), f"units without a tier: {units - set(TIER)} (add them to TIERS and ARCHITECTURE.md)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_downward(path):
    here = unit_of(module_name(path))
    bad = []
    for line, target in imports(path):
        top = target.split(".")[0]
        if top == "lorafit":
            there = unit_of(target)
            if there != here and TIER.get(there, 99) >= TIER[here]:
                bad.append(f"line {line}: {target} ({there}, tier {TIER.get(there)}) from {here} (tier {TIER[here]})")
        elif here in TORCH_FREE and top in HEAVY:
            bad.append(f"line {line}: {target} in {here}, which must import no {top}")
    assert not bad, f"{path.relative_to(SRC)} imports upward:\n  " + "\n  ".join(bad)


def test_the_estimator_and_the_cli_parser_load_no_torch():
    code = ("import sys, lorafit.cli, lorafit.memory.estimate, lorafit.memory.plan\n"
            "from lorafit.memory import catalog\n"
            "from lorafit.memory.estimate import Settings, estimate\n"
            "lorafit.cli.build_parser()\n"
            "estimate(catalog.get_model('llama-3.1-8b'), Settings())\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
