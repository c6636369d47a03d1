"""Bearer tokens of the HTTP API: each has a name and a role, and only its SHA-256 is stored.

A token is 256 random bits (``secrets``), shown once when it is created. A fast hash is enough
for secrets of that strength (a slow, salted one protects guessable passwords), and it lets a
request's token be found by its hash. Revoked tokens keep their row, so that the audit trail's
names stay resolvable.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Enum, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from service.store.database import Database
from service.store.models import Base, utcnow

PREFIX = "sgt_"  # lets secret scanners recognise a leaked StrokeGate token
MAX_TOKEN_LENGTH = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Role(str, enum.Enum):
    READER = "reader"  # reads the API and the metrics
    OPERATOR = "operator"  # also acts: re-runs studies, retries deliveries

    def allows(self, needed: Role) -> bool:
        return self is Role.OPERATOR or needed is Role.READER


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


@dataclass(frozen=True)
class Holder:
    """Who made a request: the token's name and role."""

    name: str
    role: Role


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(db: Database, name: str, role: Role) -> str:
    """A new token for ``name`` with ``role``; the only time the token itself is seen.
    ValueError when the name is malformed or taken (also by a revoked token)."""
    if not _NAME.match(name):
        raise ValueError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    token = PREFIX + secrets.token_urlsafe(32)
    with db.session() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise ValueError(f"a token named {name!r} exists already (revoked ones keep their name): choose another name")
        session.add(ApiToken(name=name, role=Role(role), token_sha256=_digest(token)))
    return token


def revoke(db: Database, name: str) -> bool:
    """Revoke the token ``name`` at once; False when there is no such active token."""
    with db.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
        if row is None:
            return False
        row.revoked_at = utcnow()
        return True


def authenticate(db: Database, token: str) -> Holder | None:
    """The holder of an active ``token``, or None."""
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None
    with db.session() as session:
        row = session.scalar(
            select(ApiToken).where(ApiToken.token_sha256 == _digest(token), ApiToken.revoked_at.is_(None))
        )
        return Holder(row.name, row.role) if row is not None else None


def listing(db: Database) -> list[TokenRecord]:
    """Every token, active and revoked, oldest first (never the tokens themselves)."""
    with db.session() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.id))
        return [TokenRecord(r.name, r.role, r.created_at, r.revoked_at) for r in rows]


def any_active(db: Database) -> bool:
    with db.session() as session:
        return session.scalar(select(ApiToken.id).where(ApiToken.revoked_at.is_(None)).limit(1)) is not None
