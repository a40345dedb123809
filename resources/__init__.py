"""Dagster resources: every external system behind a small interface (storage, media decoding, VAD, teacher)."""
