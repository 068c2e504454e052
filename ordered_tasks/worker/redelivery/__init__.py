"""Redelivery: a message that comes back after a crash runs once ("Crashes lose nothing and keep order")."""
