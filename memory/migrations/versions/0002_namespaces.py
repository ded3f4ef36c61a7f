"""Namespaces: every edit version and change-log entry belongs to a namespace; existing rows go to "default".

Also sets ``editmem_meta.schema_version`` to 2, so that editmem from before Alembic (which knows version 1) refuses
a migrated store with its own clear error instead of writing rows that ignore namespaces.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT = "default"


def upgrade() -> None:
    for table in ("editmem_edits", "editmem_changes"):
        op.add_column(table, sa.Column("namespace", sa.String(64), nullable=False, server_default=DEFAULT))
    valid_to_null = sa.text("valid_to IS NULL")
    op.create_index("ix_editmem_edits_ns_current", "editmem_edits", ["namespace", "edit_id"],
                    sqlite_where=valid_to_null, postgresql_where=valid_to_null)
    op.create_index("ix_editmem_changes_ns", "editmem_changes", ["namespace", "seq"])
    op.execute("UPDATE editmem_meta SET schema_version = 2")


def downgrade() -> None:
    op.drop_index("ix_editmem_changes_ns", table_name="editmem_changes")
    op.drop_index("ix_editmem_edits_ns_current", table_name="editmem_edits")
    with op.batch_alter_table("editmem_changes") as batch:
        batch.drop_column("namespace")
    with op.batch_alter_table("editmem_edits") as batch:
        batch.drop_column("namespace")
    op.execute("UPDATE editmem_meta SET schema_version = 1")
