"""PubMed: the MEDLINE XML parser, the E-utilities client, loading and ingestion."""
