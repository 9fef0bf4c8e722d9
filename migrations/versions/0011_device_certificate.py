"""device: certificate identity (the serial, fingerprint and expiry of the certificate the fleet CA
issued for the device's own key); a certificate device has no password hash

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cloud.registry.tables import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.alter_column("credential_hash", existing_type=sa.String(length=64), nullable=True)
        batch_op.add_column(sa.Column("cert_serial", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("cert_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cert_not_after", UTCDateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_device_cert_serial"), ["cert_serial"])
        # The API finds a device by the certificate the front verified (downloads).
        batch_op.create_unique_constraint(batch_op.f("uq_device_cert_sha256"), ["cert_sha256"])


def downgrade() -> None:
    # A certificate device cannot be expressed before this revision: it is refused, not guessed at.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM device WHERE credential_hash IS NULL")).scalar():
        raise RuntimeError("certificate devices exist: revoke and remove them before downgrading past 0011")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_device_cert_sha256"), type_="unique")
        batch_op.drop_constraint(batch_op.f("uq_device_cert_serial"), type_="unique")
        batch_op.drop_column("cert_not_after")
        batch_op.drop_column("cert_sha256")
        batch_op.drop_column("cert_serial")
        batch_op.alter_column("credential_hash", existing_type=sa.String(length=64), nullable=False)
