"""The core package `ctta` never imports hydra, streams or scripts (checked on the source, statically)."""
import ast
from pathlib import Path

import ctta

FORBIDDEN = {"hydra", "omegaconf", "streams", "scripts"}


def test_ctta_imports_no_hydra_streams_or_scripts():
    offenders = []
    for path in Path(ctta.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
