"""Launching and supervision: "Dead workers are restarted", "Warm shutdown", and unsafe workers refused."""
