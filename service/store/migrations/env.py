"""Alembic environment: the engine comes from the caller (service.store.database.upgrade)."""

from alembic import context

from service.store.models import Base
from service.store import tokens  # noqa: F401 - its table in the metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    context.run_migrations()
