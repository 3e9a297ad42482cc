"""OpenRLHF methods compiled from the installed source, for tests on machines without vLLM."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def stock_methods(relpath: str, class_name: str, names: set[str]) -> type:
    """``class_name`` of OpenRLHF's installed ``relpath`` with only the methods ``names``.

    The module-level imports those methods use are compiled along, the others (vLLM,
    DeepSpeed, Ray) left out.
    """
    path = Path(sys.modules["openrlhf"].__file__).parent / relpath
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    cls.body = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {n.name for n in cls.body} == names, f"{class_name} in {relpath} lacks one of {names}"
    cls.bases, cls.keywords, cls.decorator_list = [], [], []
    used = {n.id for n in ast.walk(cls) if isinstance(n, ast.Name)}
    imports = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            node.names = [a for a in node.names if (a.asname or a.name).split(".")[0] in used]
            if node.names:
                imports.append(node)
    module = ast.Module(body=[*imports, cls], type_ignores=[])
    namespace: dict = {"__name__": f"stock_{class_name}"}
    exec(compile(module, str(path), "exec"), namespace)
    return namespace[class_name]
