"""Fault-injection suite: real processes under real network faults (see conftest.py, fleet.py)."""
