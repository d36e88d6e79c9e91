"""The LLM response cache and per-call token/cost ledger.

One row per *successful* call, keyed by ``LLMRequest.cache_key(model)`` (a hash of model,
prompt version, messages and parameters): re-running a task, a retry or a backfill finds
its answers here and makes no new calls. Failures are deliberately not stored, so the
next run retries them. The same rows are the token and cost ledger that ``status``
sums; the (model, created_at) index serves per-model and per-period usage queries.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE llm_call (
            cache_key      text PRIMARY KEY,
            stage          text NOT NULL,
            backend        text NOT NULL,
            model          text NOT NULL,
            prompt_version text NOT NULL,
            params         jsonb NOT NULL DEFAULT '{}'::jsonb,
            output         jsonb NOT NULL,
            raw            text,
            tokens_in      integer NOT NULL DEFAULT 0,
            tokens_out     integer NOT NULL DEFAULT 0,
            cost_usd       numeric(12, 6) NOT NULL DEFAULT 0,
            latency_ms     integer NOT NULL DEFAULT 0,
            attempts       integer NOT NULL DEFAULT 0,
            created_at     timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX llm_call_model_created ON llm_call (model, created_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE llm_call;")
