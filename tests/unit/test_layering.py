"""The house rules of DESIGN.md: arrows only point down.

`protocol/` never imports torch, `training/` never imports `protocol/`, `kernels/` stands alone,
`cli/` only talks to `node/`. Checked on the source (AST), so a lazy import inside a function
counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# folder -> module prefixes it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "protocol": ("torch", "triton", "hyphae.training", "hyphae.kernels", "hyphae.node", "hyphae.cli"),
    "training": ("hyphae.protocol", "hyphae.node", "hyphae.cli"),
    "kernels": ("hyphae.protocol", "hyphae.training", "hyphae.node", "hyphae.cli"),
    "cli": ("hyphae.protocol", "hyphae.training", "hyphae.kernels", "torch"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_downward(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ holds no Python files"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path)
        if any(_matches(module, prefix) for prefix in FORBIDDEN[folder])
    ]
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_no_pickle_on_any_package_path() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("protocol", "node", "training", "kernels", "cli")
        for path in (ROOT / folder).rglob("*.py")
        for line, module in _imports(path)
        if module in ("pickle", "cloudpickle", "dill", "marshal")
    ]
    assert not bad, "pickle-like modules imported: " + ", ".join(bad)
