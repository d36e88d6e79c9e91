"""``llm_call.subtree``: which subtree's run paid for each stored call.

The cache is keyed by request content, so a call belongs to whichever subtree's run made
it first (a later identical request from another subtree is a cache hit and costs
nothing). Per-subtree LLM calls, tokens and cost (``meshdistill status``, the dashboard)
sum this column; calls stored outside a subtree run (calibration, tests) keep NULL.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE llm_call ADD COLUMN subtree text;
        CREATE INDEX llm_call_subtree ON llm_call (subtree) WHERE subtree IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE llm_call DROP COLUMN subtree;")
