"""Exclusivity: "Exactly one active consumer per partition" and "One task at a time per partition"."""
