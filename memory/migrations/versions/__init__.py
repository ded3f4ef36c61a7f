"""Alembic revisions of the store's schema, oldest first: 0001 (the schema before Alembic), 0002 (namespaces)."""
