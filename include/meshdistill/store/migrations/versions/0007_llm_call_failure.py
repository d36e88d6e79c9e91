"""``llm_call`` also keeps what a model answered that could not be used.

A reply that fails validation after its repair, or a refusal, is the model's answer to
that exact request (model, prompt version, messages, parameters), as repeatable as a
valid one: it is stored with ``failure`` and ``error`` set and ``output`` JSON ``null``,
so a rerun replays it without paying for it again. Transient failures (timeouts, 5xx,
429, connection) are never stored. See docs/llm.md, "The llm_call cache".

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE llm_call ADD COLUMN failure text, ADD COLUMN error text;
        ALTER TABLE llm_call ADD CONSTRAINT llm_call_failure_kind
            CHECK (failure IS NULL OR failure IN ('invalid_output', 'refused'));
        """
    )


def downgrade() -> None:
    op.execute("DELETE FROM llm_call WHERE failure IS NOT NULL;"
               "ALTER TABLE llm_call DROP COLUMN failure, DROP COLUMN error;")
