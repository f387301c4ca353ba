"""The web dashboard (issue 20, docs/ui.md): ``router`` is mounted at ``/`` by controller/http/app.py."""

from .routes import router

__all__ = ["router"]
