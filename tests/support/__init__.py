"""Helpers shared by the test modules (test modules import from here, never from each other)."""
