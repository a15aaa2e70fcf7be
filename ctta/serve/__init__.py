"""`ctta.serve`: a deployed CLIP that adapts online behind HTTP (optional extra: ``pip install "ctta[serve]"``).

Built objects in, a server out; no configuration system here (the core never imports hydra)::

    import ctta
    from ctta.serve import ServeOptions, serve
    adapter = ctta.wrap(ctta.Clip.from_pretrained("micro-clip", "builtin"), Tent(), ["red star", "blue circle"])
    serve(adapter, ServeOptions(state_path="state/tent.pt", snapshot_every_s=60), port=8000)

`scripts/serve.py` builds the same from the hydra config groups of `scripts/run.py` (model, strategy, classes,
templates, reset policy). Pieces: `options` (limits, errors), `inputs` (request parsing and decoding under limits),
`batcher` (micro-batching in arrival order), `service` (the adapter, its state file, metrics updates), `metrics`
(Prometheus), `app` (FastAPI routes), `server` (uvicorn with draining shutdown).
"""
from __future__ import annotations

from ctta.serve.options import ServeError, ServeOptions, StateError

_EXTRA = ('ctta serve needs its optional dependencies: pip install "ctta[serve]" (fastapi, uvicorn, '
          'prometheus-client, python-multipart)')


def require() -> None:
    """Raise an ImportError naming the extra when the web stack is missing."""
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "multipart")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{_EXTRA}; missing: {', '.join(missing)}")


def __getattr__(name: str):
    """`create_app`, `serve` and `Service` import the web stack on first use, so `ServeOptions` works without it."""
    if name in ("create_app", "serve", "Service"):
        require()
        if name == "create_app":
            from ctta.serve.app import create_app
            return create_app
        if name == "serve":
            from ctta.serve.server import serve
            return serve
        from ctta.serve.service import Service
        return Service
    raise AttributeError(f"module 'ctta.serve' has no attribute {name!r}")


__all__ = ["ServeError", "ServeOptions", "StateError", "create_app", "require", "serve", "Service"]
