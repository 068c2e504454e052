"""Partition health: "Quiet periods and slow tasks do not stall a partition", made visible."""
