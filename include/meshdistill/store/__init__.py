"""PostgreSQL: connection, embedded server, migrations, bulk writes and queries."""

from meshdistill.store.db import connect, get_engine, resolve_database_url

__all__ = ["connect", "get_engine", "resolve_database_url"]
