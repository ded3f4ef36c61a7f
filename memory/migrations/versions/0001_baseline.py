"""Baseline: the schema of editmem before Alembic (schema_version 1, commit bf5447c), weight tables included.

A store made before Alembic has these tables already and is stamped with this revision, not upgraded through it
(:mod:`memory.migrate`); ``upgrade`` creates them on an empty database.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "editmem_meta",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("store_uid", sa.String(36), nullable=False),
        sa.Column("encoder", sa.String(200), nullable=False),
        sa.Column("change_seq", sa.BigInteger, nullable=False),
        sa.Column("next_edit_id", sa.BigInteger, nullable=False),
        sa.Column("next_row_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "editmem_edits",
        sa.Column("row_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("edit_id", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("target_new", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=True),
        sa.Column("ground_truth", sa.Text, nullable=True),
        sa.Column("rephrases", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("content_key", sa.String(64), nullable=False),
        sa.UniqueConstraint("edit_id", "version", name="uq_editmem_edits_version"),
    )
    op.create_index("ix_editmem_edits_content_key", "editmem_edits", ["content_key"])
    valid_to_null = sa.text("valid_to IS NULL")
    op.create_index("ix_editmem_edits_current", "editmem_edits", ["edit_id"], sqlite_where=valid_to_null,
                    postgresql_where=valid_to_null)
    op.create_table(
        "editmem_embeddings",
        sa.Column("row_id", sa.BigInteger, nullable=False),
        sa.Column("encoder", sa.String(200), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("row_id", "encoder", name="pk_editmem_embeddings"),
    )
    op.create_table(
        "editmem_changes",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("row_id", sa.BigInteger, nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("seq", "row_id", name="pk_editmem_changes"),
    )
    op.create_table(
        "editmem_weight_models",
        sa.Column("model_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(200), nullable=False),
        sa.Column("base", sa.Text, nullable=False),
        sa.Column("folder", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("folder", name="uq_editmem_weight_models_folder"),
    )
    op.create_table(
        "editmem_weight_records",
        sa.Column("record_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer, nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("settings", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("deltas", sa.LargeBinary, nullable=False),
        sa.Column("applied", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_editmem_weight_records_model", "editmem_weight_records", ["model_id", "record_id"])
    op.create_table(
        "editmem_weight_links",
        sa.Column("record_id", sa.Integer, nullable=False),
        sa.Column("edit_id", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("record_id", "edit_id", name="pk_editmem_weight_links"),
    )
    op.create_index("ix_editmem_weight_links_edit", "editmem_weight_links", ["edit_id"])
    op.create_table(
        "editmem_weight_bases",
        sa.Column("model_id", sa.Integer, nullable=False),
        sa.Column("param", sa.String(500), nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "param", name="pk_editmem_weight_bases"),
    )


def downgrade() -> None:
    for name in ("editmem_weight_bases", "editmem_weight_links", "editmem_weight_records", "editmem_weight_models",
                 "editmem_changes", "editmem_embeddings", "editmem_edits", "editmem_meta"):
        op.drop_table(name)
