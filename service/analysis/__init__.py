"""The per-study pipeline: series in, one Findings object out."""
