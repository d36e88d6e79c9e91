"""Distillation stages: generate, retrieve, MeSH-grade, judge, answer (pipeline steps 3-7)."""
