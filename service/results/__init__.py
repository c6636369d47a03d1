"""Findings to DICOM objects radiologists and machines read: SEG, SR."""
