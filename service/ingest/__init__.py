"""DICOM in: the C-STORE receiver, the spool, and study-completion tracking."""
