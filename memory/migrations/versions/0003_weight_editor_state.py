"""Weight records get ``editor_state``: an optional opaque blob an editor keeps beside a record for its later calls
(AlphaEdit: the keys the record's edits were written at, so a later process counts them without recomputing them).

The column is nullable and older code never reads it, so ``editmem_meta.schema_version`` stays 2. A store whose weight
tables were created from this code's table definitions before the Alembic stamp (a store from before Alembic that had
no weight tables) has the column already: it is added only where missing.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "editmem_weight_records"
COLUMN = "editor_state"


def _has_column() -> bool:
    return COLUMN in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(TABLE)}


def upgrade() -> None:
    if not _has_column():
        op.add_column(TABLE, sa.Column(COLUMN, sa.LargeBinary, nullable=True))


def downgrade() -> None:
    if _has_column():
        with op.batch_alter_table(TABLE) as batch:
            batch.drop_column(COLUMN)
