"""Management commands of the example accounts app."""
