"""``ctta serve ...`` and ``python -m ctta.serve ...``: start scripts/serve.py, which composes the server's config
with hydra (the core package never imports hydra, so the composition cannot live here).

The launcher replaces itself with ``python scripts/serve.py ARGS`` (``os.execv``: signals such as SIGTERM reach the
server directly, with no parent in between). The script is found beside the package, which is where it is in a
source checkout or an editable install (``pip install -e ".[serve]"``). A wheel carries no scripts/: then the
launcher says so and how to serve from Python instead (`ctta.serve.serve` takes built objects).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

USAGE = """usage: ctta serve [key=value ...] [--debug]     (same as: python scripts/serve.py [key=value ...])

Serves a CLIP that adapts online behind HTTP; 'ctta serve --help' lists the config groups and keys."""


def script() -> Path | None:
    """scripts/serve.py of the checkout this package was imported from, or None (an installed wheel)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
    return path if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """``ctta serve ARGS`` -> ``python scripts/serve.py ARGS`` (does not return when the script is found)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "serve":
        print(USAGE, file=sys.stderr if args[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    return run_script(args[1:])


def run_script(args: Sequence[str]) -> int:
    path = script()
    if path is None:
        print("error: ctta serve composes its configuration with hydra from scripts/serve.py and configs/, which a "
              "source checkout has and an installed wheel does not.\nhint: clone the repository and run "
              "'pip install -e \".[serve]\"' (then 'ctta serve ...' works), or serve from Python: "
              "ctta.serve.serve(ctta.wrap(model, strategy, classes), ctta.serve.ServeOptions(...))", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(path), *args])
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
