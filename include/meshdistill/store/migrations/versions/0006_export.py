"""Exports: one row per export that completed, written after its manifest.

An export's shards and manifest live at ``location``; the row repeats the settings, the
counts and the manifest so ``meshdistill status`` and the dashboard need not read object
storage. A row exists only for an export whose manifest was written (see
docs/export.md, "Atomic exports").

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE export (
            id          text PRIMARY KEY,
            created_at  timestamptz NOT NULL DEFAULT now(),
            params      jsonb NOT NULL,
            counts      jsonb NOT NULL,
            manifest    jsonb NOT NULL,
            location    text  NOT NULL
        );
        CREATE INDEX export_created_at ON export (created_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE export;")
