"""``python -m tether.sim``: the same as ``tether-sim``."""

from .main import main

main()
