"""The shape of the repository: the rules a reader relies on when finding their way."""

import ast
from collections import Counter

from danet.paths import REPO

SOURCE_FOLDERS = ("danet", "sweeps", "reports", "ablations")


def _modules(folders=SOURCE_FOLDERS):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name != "__init__.py":
                yield path


def _imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_two_modules_share_a_file_name():
    counts = Counter(path.name for path in _modules())
    assert [name for name, count in counts.items() if count > 1] == []


def test_no_library_module_imports_the_command_line():
    library = [path for path in _modules() if path.parts[len(REPO.parts)] == "danet" and path.name != "cli.py"]
    assert library and [path for path in library if "danet.cli" in _imported(path)] == []


def test_no_module_imports_a_report_script():
    scripts = {"reports.make_tables", "reports.plan"}
    assert [path for path in _modules((*SOURCE_FOLDERS, "tests")) if scripts & _imported(path)] == []


def test_the_report_script_is_thin():
    tree = ast.parse((REPO / "reports" / "make_tables.py").read_text())
    main, = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 40
