"""Scoring, reports and the per-slice outputs that are scored."""
