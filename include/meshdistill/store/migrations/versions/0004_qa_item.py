"""Distillation results: one ``qa_item`` row per candidate, and preference pairs.

One table with a ``state`` column (CHECK constraints tie each state to the columns it
needs), not question/context/grade/answer tables: that every candidate ends in exactly
one terminal state is then a property of the schema, not a join to audit. A candidate is
one question of one generator profile about one source; a generation that produced
nothing is one row with ordinal 0 and no question, which a later successful run
overwrites. The natural key (subtree, source_pmid, model, profile, ordinal) makes every
write an upsert; ``stage`` is the last stage the candidate reached. A preference pair
joins the two profiles' candidates at the same ordinal for one source: the higher item
hierarchy score is chosen, kept when the margin clears the run's threshold.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE qa_item (
            id               bigserial PRIMARY KEY,
            subtree          text    NOT NULL,
            source_pmid      bigint  NOT NULL,
            model            text    NOT NULL,
            profile          text    NOT NULL,
            ordinal          integer NOT NULL CHECK (ordinal >= 0),
            backend          text    NOT NULL,
            prompt_versions  jsonb   NOT NULL DEFAULT '{}'::jsonb,
            params           jsonb   NOT NULL DEFAULT '{}'::jsonb,
            qtype            text CHECK (qtype IN ('yesno', 'factoid', 'list', 'summary')),
            question         text,
            answer_hint      text,
            evidence         text,
            question_mesh    text[],
            contexts         jsonb,
            retrieval_score  real,
            hierarchy_score  real,
            blend_score      real,
            judgement        jsonb,
            answer           text,
            label            text CHECK (label IN ('yes', 'no', 'maybe')),
            cited_pmids      bigint[],
            answer_evidence  jsonb,
            state            text NOT NULL
                             CHECK (state IN ('accepted', 'rejected', 'failed', 'deferred')),
            stage            text NOT NULL
                             CHECK (stage IN ('generate', 'retrieve', 'grade', 'judge',
                                              'answer')),
            reason           text,
            error            text,
            run_id           text NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            UNIQUE (subtree, source_pmid, model, profile, ordinal),
            CHECK (state <> 'accepted' OR (question IS NOT NULL AND answer IS NOT NULL
                                           AND judgement IS NOT NULL)),
            CHECK (state <> 'rejected' OR reason IS NOT NULL),
            CHECK (state <> 'failed' OR error IS NOT NULL),
            CHECK (question IS NOT NULL OR (stage = 'generate' AND ordinal = 0
                                            AND state IN ('failed', 'deferred')))
        );
        CREATE INDEX qa_item_subtree_state ON qa_item (subtree, state);
        CREATE INDEX qa_item_source ON qa_item (source_pmid);

        CREATE TABLE preference_pair (
            id              bigserial PRIMARY KEY,
            subtree         text    NOT NULL,
            source_pmid     bigint  NOT NULL,
            model           text    NOT NULL,
            ordinal         integer NOT NULL,
            chosen_id       bigint  NOT NULL REFERENCES qa_item (id) ON DELETE CASCADE,
            rejected_id     bigint  NOT NULL REFERENCES qa_item (id) ON DELETE CASCADE,
            chosen_score    real    NOT NULL,
            rejected_score  real    NOT NULL,
            margin          real    NOT NULL CHECK (margin >= 0),
            run_id          text    NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            UNIQUE (subtree, source_pmid, model, ordinal),
            CHECK (chosen_id <> rejected_id)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE preference_pair; DROP TABLE qa_item;")
