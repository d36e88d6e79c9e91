"""Export: accepted items and preference pairs as training shards (docs/export.md)."""
