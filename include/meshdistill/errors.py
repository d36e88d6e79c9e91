"""Errors a user can act on.

Each carries a message written for the person running the pipeline, so the CLI and the
Airflow task log can print it as is instead of a traceback.
"""


class MeshDistillError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(MeshDistillError):
    """Configuration is missing or contradictory."""


class NothingToExportError(MeshDistillError):
    """No accepted item or preference pair passes an export's filters: retrying cannot
    help until more is distilled or the filters change."""


class UnknownSubtreeError(MeshDistillError):
    """A tree-number prefix that matches no MeSH tree number."""

    def __init__(self, prefix: str, suggestions: list[str]) -> None:
        self.prefix = prefix
        self.suggestions = suggestions
        hint = f"; closest valid: {', '.join(suggestions)}" if suggestions else ""
        super().__init__(f"unknown MeSH subtree {prefix!r}{hint}")


class MeshSourceError(MeshDistillError):
    """A MeSH release file that cannot be read or recognised."""


class PubmedParseError(MeshDistillError):
    """A MEDLINE/PubMed XML file that is truncated or malformed.

    ``parsed`` counts the complete records read before the fault: those are valid and
    are kept by the loader.
    """

    def __init__(self, source: str, reason: str, parsed: int) -> None:
        self.source = source
        self.reason = reason
        self.parsed = parsed
        super().__init__(f"{source}: {reason} (after {parsed} complete records)")


class EutilsError(MeshDistillError):
    """E-utilities answered with an error, or kept failing after retries."""


class WindowTooLargeError(EutilsError):
    """A single day holds more records than esearch can page through."""
