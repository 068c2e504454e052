"""A randomized, seeded adversarial test of ordered workers: workload, nemesis, history, checker."""
