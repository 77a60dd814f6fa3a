"""Data generators shared by tests (no Ray, no network)."""
