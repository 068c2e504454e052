"""An account owns offices; members belong to one office of their account."""

from __future__ import annotations

from django.db import models


class Account(models.Model):
    """A customer account; ``last_seq`` is the sequence number of its last applied event."""

    name = models.CharField(max_length=100, help_text="Display name.")
    last_seq = models.IntegerField(default=0, help_text="Sequence number of the last event applied.")
    out_of_order = models.IntegerField(default=0, help_text="Events that arrived after a later one.")
    failed = models.IntegerField(default=0, help_text="Events that failed.")
    processed = models.IntegerField(default=0, help_text="Events handled, failed or not.")


class Office(models.Model):
    """An office of an account."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="offices")
    name = models.CharField(max_length=100, help_text="Office name, unique per account.")

    class Meta:
        unique_together = [("account", "name")]


class Member(models.Model):
    """A person working in one office of an account."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="members")
    office = models.ForeignKey(Office, on_delete=models.CASCADE, related_name="members")
    email = models.CharField(max_length=200, help_text="Member address, unique per account.")

    class Meta:
        unique_together = [("account", "email")]


class HandledEvent(models.Model):
    """One event a worker handled: when it finished and how it went (the demo plots these)."""

    run = models.CharField(max_length=20, help_text="Which task ran it: plain, ordered or external.")
    account_id = models.IntegerField(help_text="The account (kept when the demo resets the accounts).")
    seq = models.IntegerField(help_text="Publish sequence number of the event within its account.")
    kind = models.CharField(max_length=50, help_text="Event type.")
    finished = models.FloatField(help_text="Unix time at which the worker finished it.")
    out_of_order = models.BooleanField(default=False, help_text="It ran after a later event of its account.")
    failed = models.BooleanField(default=False, help_text="It could not be applied.")

    class Meta:
        indexes = [models.Index(fields=["run", "account_id"])]
