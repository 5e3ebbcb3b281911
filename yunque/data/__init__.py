"""Data pipeline: cleaning, deduplication and PII / secret scrubbing of raw text corpora."""
