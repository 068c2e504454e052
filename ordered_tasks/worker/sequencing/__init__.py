"""Per-key order inside a partition: a window of unacknowledged messages, one lane per key."""
