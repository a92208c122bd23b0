"""Alembic environment: migrates the connection the store hands over.

``gyoza.server.store.schema.upgrade`` builds the Alembic configuration in code and puts
an open connection in ``config.attributes["connection"]``; there is no alembic.ini.
To write a new revision, from a Python shell::

    from alembic import command
    from gyoza.server.store.schema import alembic_config
    command.revision(alembic_config(), message="what changes", rev_id="0005")

and write its ``upgrade()`` by hand (SQLite needs ``op.batch_alter_table`` to alter).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from gyoza.server.store.tables import metadata

config = context.config


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _migrate(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("gyoza migrations run online only")
run()
