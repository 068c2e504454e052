"""Accounts, offices and members: the example domain whose events must run in order."""
