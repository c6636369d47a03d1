"""DICOM series to arrays with geometry, and what each series is."""
