"""Distillation: generate, retrieve, MeSH-grade, judge, answer (docs/architecture.md,
"Pipeline steps")."""
