"""DICOM out: the persistent outbox and its C-STORE sender."""
