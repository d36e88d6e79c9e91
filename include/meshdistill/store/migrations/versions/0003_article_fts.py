"""Full-text index for retrieval, kept in a side table outside the load path.

``article_fts`` holds ``setweight(title, 'A') || setweight(abstract, 'B')`` (english) for
active articles with an abstract, with the content hash it was built from, and a GIN
index. It is refreshed in bulk by ``meshdistill.distill.retrieve.refresh_index`` before
retrieval, not maintained by the loader: building tsvectors costs ≈1.2 s per 15,000
abstracts, and a stored generated column on ``article`` halved the loader's rate (first
load of pubmed20n0014: 2.80 s without it, 5.28 s with it; an unchanged reload 1.43 s →
3.12 s, since PostgreSQL computes generated columns before ``ON CONFLICT`` sees the row
is unchanged). Ranking reads the stored vector of every match, so it must be stored
somewhere: a generic question takes 0.86 s with an expression index, 31 ms stored.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE article_fts (
            pmid         bigint PRIMARY KEY,
            content_hash text,
            fts          tsvector NOT NULL
        );
        CREATE INDEX article_fts_gin ON article_fts USING gin (fts);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE article_fts")
