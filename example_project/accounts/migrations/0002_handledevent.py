"""The handled events that the demo plots."""

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="HandledEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("run", models.CharField(help_text="Which task ran it: plain, ordered or external.", max_length=20)),
                ("account_id", models.IntegerField(help_text="The account (kept when the demo resets the accounts).")),
                ("seq", models.IntegerField(help_text="Publish sequence number of the event within its account.")),
                ("kind", models.CharField(help_text="Event type.", max_length=50)),
                ("finished", models.FloatField(help_text="Unix time at which the worker finished it.")),
                ("out_of_order", models.BooleanField(default=False, help_text="It ran after a later event of its account.")),
                ("failed", models.BooleanField(default=False, help_text="It could not be applied.")),
            ],
            options={
                "indexes": [models.Index(fields=["run", "account_id"], name="accounts_ha_run_830084_idx")],
            },
        ),
    ]
