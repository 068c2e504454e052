"""Migrations of the example accounts app."""
