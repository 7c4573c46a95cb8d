"""Non-durable messages live in UNLOGGED tables on PostgreSQL: no WAL, emptied by a crash.

The delivery table goes first: a logged table may not reference an unlogged one.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

TABLES = ["messaging_transientdelivery", "messaging_transientmessage"]


def set_unlogged(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for table in TABLES:
            schema_editor.execute(f"ALTER TABLE {table} SET UNLOGGED")


def set_logged(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        for table in reversed(TABLES):
            schema_editor.execute(f"ALTER TABLE {table} SET LOGGED")


class Migration(migrations.Migration):
    dependencies = [("messaging", "0001_initial")]
    operations = [migrations.RunPython(set_unlogged, set_logged)]
