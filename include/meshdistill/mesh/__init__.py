"""NLM MeSH: release file readers, joining of sources, tree operations, subtree queries."""
