"""Our DICOM upper layer and DIMSE codec, shared by the receiver (ingest) and the sender (delivery)."""
