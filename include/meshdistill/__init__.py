"""meshdistill: MeSH-guided distillation of biomedical QA training data from PubMed.

Everything here is plain Python with no Airflow imports, so the CLI, the DAGs and the
tests all drive the same functions.
"""

__version__ = "0.1.0"
