"""job export state: claims made, when the next may start, and when the export ended

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("export_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("export_next_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("export_done_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_export_next_at"), ["export_next_at"])


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_export_next_at"))
        batch_op.drop_column("export_done_at")
        batch_op.drop_column("export_next_at")
        batch_op.drop_column("export_attempts")
