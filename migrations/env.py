"""Alembic environment: the engine comes from the caller (cloud.registry.migrate), never a config file."""

from alembic import context

from cloud.registry.migrate import include_name
from cloud.registry.tables import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Run the migrations on the engine the caller passed in the config's attributes."""
    engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
            compare_type=True,
            include_name=include_name,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `diredi db upgrade`")
run_migrations_online()
