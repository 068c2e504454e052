"""Failures: "A failure blocks its key", "Retries happen in place", "Nothing is dropped", "Replay order"."""
