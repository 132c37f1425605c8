"""job.cache_key (the result cache's key) and job.cached_from (the job a cached result came from)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cached_from", sa.String(length=40), nullable=True))
        batch_op.create_index("ix_job_tenant_cache_key", ["tenant_id", "cache_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_tenant_cache_key")
        batch_op.drop_column("cached_from")
        batch_op.drop_column("cache_key")
