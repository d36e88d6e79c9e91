"""Document frequency of each lexeme of ``article_fts``, for retrieval's candidate pruning.

``lexeme_df(lexeme, ndoc)``: in how many rows of ``article_fts`` each lexeme occurs. The
retrieval query (``meshdistill.distill.retrieve``) takes its candidates from the rows that
match the question's rarest lexemes only, picked by these counts, instead of every row
matching any of its lexemes: an OR over common lexemes ("patient", "studi", "cell")
matched tens of thousands of rows per question, each ranked by ``ts_rank_cd``.
``refresh_index`` keeps the counts in step with ``article_fts`` incrementally (the vectors
it removes are subtracted, the ones it adds are added). The upgrade fills the table from
the vectors already indexed, so an existing database needs no re-index.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE lexeme_df (
            lexeme text PRIMARY KEY,
            ndoc   integer NOT NULL
        );
        INSERT INTO lexeme_df (lexeme, ndoc)
        SELECT word, ndoc FROM ts_stat('SELECT fts FROM article_fts');
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE lexeme_df")
