"""``python -m ctta.serve [key=value ...]``: the same as ``ctta serve ...`` (see `ctta.serve.launch`)."""
import sys

from ctta.serve.launch import run_script

if __name__ == "__main__":
    raise SystemExit(run_script(sys.argv[1:]))
