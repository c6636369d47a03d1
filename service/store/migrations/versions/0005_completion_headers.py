"""Study completion from headers: each series' NumberOfTemporalPositions and ImagesInAcquisition,
each instance's slice position

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series') as batch:
        batch.add_column(sa.Column('temporal_positions', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('images_in_acquisition', sa.Integer(), nullable=True))
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('slice_position', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('slice_position')
    with op.batch_alter_table('series') as batch:
        batch.drop_column('images_in_acquisition')
        batch.drop_column('temporal_positions')
