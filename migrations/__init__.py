"""Alembic migrations; `squish db upgrade` (or app.migrate.upgrade) applies them."""
