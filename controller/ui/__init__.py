"""The web dashboard (issue 20, docs/ui.md): controller/http/app.py mounts it at ``/`` with ``mount``."""

from .routes import mount, router

__all__ = ["mount", "router"]
