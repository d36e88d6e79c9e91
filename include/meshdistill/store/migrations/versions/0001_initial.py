"""MeSH, articles, ingestion bookkeeping and the shared NCBI rate limiter.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE mesh_descriptor (
            ui               text PRIMARY KEY,
            name             text NOT NULL,
            scope_note       text,
            descriptor_class text,
            mesh_year        integer,
            source           text NOT NULL,
            updated_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX mesh_descriptor_name ON mesh_descriptor (lower(name));

        -- Keyed by tree number; ui stays NULL while no source has joined the name to a UI.
        CREATE TABLE mesh_tree (
            tree_number text PRIMARY KEY,
            name        text NOT NULL,
            ui          text,
            mesh_year   integer,
            source      text NOT NULL
        );
        CREATE INDEX mesh_tree_ui ON mesh_tree (ui);
        CREATE INDEX mesh_tree_prefix ON mesh_tree (tree_number text_pattern_ops);
        CREATE INDEX mesh_tree_unjoined ON mesh_tree (lower(name)) WHERE ui IS NULL;

        CREATE TABLE mesh_entry_term (
            ui   text NOT NULL,
            term text NOT NULL,
            PRIMARY KEY (ui, term)
        );
        CREATE INDEX mesh_entry_term_lower ON mesh_entry_term (lower(term));

        CREATE TABLE mesh_release (
            id         bigserial PRIMARY KEY,
            mesh_year  integer,
            sources    jsonb NOT NULL,
            counts     jsonb NOT NULL,
            report     jsonb NOT NULL,
            loaded_at  timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE article (
            pmid              bigint PRIMARY KEY,
            title             text,
            abstract          text,
            sections          jsonb,
            journal           text,
            pub_year          integer,
            languages         jsonb,
            publication_types jsonb,
            keywords          jsonb,
            doi               text,
            pmc               text,
            revised           date,
            entrez_date       date,
            status            text NOT NULL DEFAULT 'active'
                              CHECK (status IN ('active', 'deleted', 'retracted')),
            source            text NOT NULL,
            content_hash      text,
            ingested_at       timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX article_status ON article (status);

        -- No foreign key to article: articles are never deleted (deletions are
        -- tombstones), the loader writes both in one transaction, and the FK trigger
        -- doubled the cost of bulk loads.
        CREATE TABLE article_mesh (
            pmid       bigint NOT NULL,
            ui         text NOT NULL,
            major      boolean NOT NULL,
            qualifiers jsonb NOT NULL DEFAULT '[]',
            PRIMARY KEY (pmid, ui)
        );
        CREATE INDEX article_mesh_ui ON article_mesh (ui);

        -- A retraction notice may arrive before or after the article it retracts.
        CREATE TABLE retraction (
            pmid        bigint PRIMARY KEY,
            notice_pmid bigint NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE ingest_batch (
            id           bigserial PRIMARY KEY,
            source       text NOT NULL,
            subtree      text,
            item         text NOT NULL,
            window_from  date,
            window_to    date,
            expected     integer,
            parsed       integer NOT NULL DEFAULT 0,
            loaded       integer NOT NULL DEFAULT 0,
            unchanged    integer NOT NULL DEFAULT 0,
            deleted      integer NOT NULL DEFAULT 0,
            skipped      integer NOT NULL DEFAULT 0,
            status       text NOT NULL
                         CHECK (status IN ('succeeded', 'partial', 'failed')),
            error        text,
            started_at   timestamptz NOT NULL,
            finished_at  timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE ingest_skip (
            batch_id bigint NOT NULL REFERENCES ingest_batch (id) ON DELETE CASCADE,
            pmid     text,
            reason   text NOT NULL
        );

        CREATE TABLE ingest_watermark (
            subtree     text NOT NULL,
            source      text NOT NULL,
            watermark   date NOT NULL,
            last_count  integer NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (subtree, source)
        );

        -- One row per rate-limited service; callers reserve the next free slot atomically.
        CREATE TABLE rate_limit_slot (
            name      text PRIMARY KEY,
            next_slot timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE rate_limit_slot, ingest_watermark, ingest_skip, ingest_batch, retraction,
                   article_mesh, article, mesh_release, mesh_entry_term, mesh_tree,
                   mesh_descriptor;
        """
    )
