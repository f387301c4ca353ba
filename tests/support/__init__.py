"""Test infrastructure shared by the suite (brokers, Docker images, waiting)."""
