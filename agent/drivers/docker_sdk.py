"""The Docker SDK (and requests, which it brings), imported without requests' character-set detection.

The SDK talks to the Docker Engine API over a local socket, whose answers are JSON (UTF-8)
and log streams the driver decodes itself; requests never needs to guess an encoding for
it. Yet ``import requests`` loads charset_normalizer, its detector, which costs an agent
2.7 MB of resident memory (measured: RSS after each import, bench/footprint.py). Importing
the SDK while ``charset_normalizer`` is marked absent makes requests fall back to UTF-8,
which it documents and supports (``requests.compat.chardet`` is None); its warning about
the missing detector is silenced for that import only. If requests or the detector is
already loaded (a process that also runs other code), nothing is changed.

``agent/registry.py`` fetches image blobs from registries with the same requests, so it
imports it from here (registries answer JSON and binary blobs: no guessing needed either).
"""

from __future__ import annotations

import sys
import warnings

_MARK_ABSENT = "charset_normalizer" not in sys.modules and "requests" not in sys.modules
if _MARK_ABSENT:
    sys.modules["charset_normalizer"] = None  # type: ignore[assignment]  # import raises ImportError
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to find acceptable character detection")
        import docker
        import docker.errors
        import requests
finally:
    if _MARK_ABSENT:
        del sys.modules["charset_normalizer"]  # anything else may import it for real

__all__ = ["docker", "requests"]
