"""Alembic environment: runs on the connection handed over by ``meshdistill.store.migrate``."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
