"""NIHSS records with their provenance, clinical result versions, the studies' IssuerOfPatientID

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_issuer', sa.String(length=64), nullable=True))
    op.create_table('nihss_records',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_issuer', sa.String(length=64), nullable=True),
    sa.Column('value', sa.Integer(), nullable=False),
    sa.Column('assessed_at', sa.DateTime(), nullable=False),
    sa.Column('source', sa.Enum('hl7', 'fhir', 'rest', 'dicom/cli', name='nihsssource', native_enum=False, length=16), nullable=False),
    sa.Column('source_id', sa.String(length=128), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source', 'source_id')
    )
    with op.batch_alter_table('nihss_records', schema=None) as batch_op:
        batch_op.create_index('ix_nihss_patient', ['patient_id'], unique=False)
    op.create_table('clinical_results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('nihss_id', sa.Integer(), nullable=True),
    sa.Column('result_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.ForeignKeyConstraint(['nihss_id'], ['nihss_records.id'], ),
    sa.ForeignKeyConstraint(['result_id'], ['result_objects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id', 'revision')
    )


def downgrade() -> None:
    op.drop_table('clinical_results')
    with op.batch_alter_table('nihss_records', schema=None) as batch_op:
        batch_op.drop_index('ix_nihss_patient')
    op.drop_table('nihss_records')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('patient_issuer')
