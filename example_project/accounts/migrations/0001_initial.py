"""Initial tables of the example accounts app."""

from __future__ import annotations

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Account",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(help_text="Display name.", max_length=100)),
                ("last_seq", models.IntegerField(default=0, help_text="Sequence number of the last event applied.")),
                ("out_of_order", models.IntegerField(default=0, help_text="Events that arrived after a later one.")),
                ("failed", models.IntegerField(default=0, help_text="Events that failed.")),
                ("processed", models.IntegerField(default=0, help_text="Events handled, failed or not.")),
            ],
        ),
        migrations.CreateModel(
            name="Office",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(help_text="Office name, unique per account.", max_length=100)),
                ("account", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="offices", to="accounts.account")),
            ],
            options={"unique_together": {("account", "name")}},
        ),
        migrations.CreateModel(
            name="Member",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("email", models.CharField(help_text="Member address, unique per account.", max_length=200)),
                ("account", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="members", to="accounts.account")),
                ("office", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="members", to="accounts.office")),
            ],
            options={"unique_together": {("account", "email")}},
        ),
    ]
