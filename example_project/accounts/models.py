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
