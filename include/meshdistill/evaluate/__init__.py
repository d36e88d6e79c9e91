"""Evaluation of the ranking signals against labelled benchmarks (PubMedQA-L)."""
