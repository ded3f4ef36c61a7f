"""Alembic migration scripts for the store's SQL schema (run by :mod:`memory.migrate`; no alembic.ini is needed)."""
