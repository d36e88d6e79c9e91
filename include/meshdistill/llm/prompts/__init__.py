"""Versioned prompt templates, kept as files next to this loader.

Prompts are data: a template change is a reviewable diff to one file, and its version is
part of every cache key and stored record, so an edited prompt never serves answers
cached for the old one. A template is ``<name>_v<N>.md``: ``--- system`` and
``--- user`` (and optionally ``--- assistant``) sections, with ``$variables`` filled by
:class:`string.Template`. ``$`` rather than ``{}`` placeholders so templates may show
JSON literally; every variable must be supplied (a typo fails loudly, not silently).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template
from typing import Literal, TypedDict, cast

Role = Literal["system", "user", "assistant"]
_NAME = re.compile(r"^(?P<name>[a-z][a-z0-9_]*?)_v(?P<version>[0-9]+)\.md$")
_SECTION = re.compile(r"^--- (system|user|assistant)[ \t]*$", re.MULTILINE)


class ChatMessage(TypedDict):
    """One chat message, in the shape the Chat Completions API takes."""

    role: Role
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready to send: its version label (``judge_v1``) and its messages."""

    version: str
    messages: tuple[ChatMessage, ...]


@cache
def available() -> dict[str, tuple[int, ...]]:
    """Template names and their versions, found among the package's files."""
    found: dict[str, list[int]] = {}
    for entry in resources.files(__name__).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.setdefault(match["name"], []).append(int(match["version"]))
    return {name: tuple(sorted(versions)) for name, versions in found.items()}


@cache
def _template(name: str, version: int) -> tuple[tuple[Role, Template], ...]:
    text = resources.files(__name__).joinpath(f"{name}_v{version}.md").read_text("utf-8")
    parts = _SECTION.split(text)
    if parts[0].strip():
        raise ValueError(f"prompt {name}_v{version}: text before the first '--- role' line")
    sections: list[tuple[Role, Template]] = []
    for role, body in zip(parts[1::2], parts[2::2], strict=True):
        sections.append((cast(Role, role), Template(body.strip("\n"))))
    if not sections:
        raise ValueError(f"prompt {name}_v{version} has no '--- system|user' sections")
    return tuple(sections)


def render(name: str, variables: dict[str, str], version: int | None = None) -> RenderedPrompt:
    """Render template ``name`` (latest version unless ``version`` is given).

    Raises ``KeyError`` for an unknown template or version and for a missing variable.
    """
    versions = available().get(name)
    if not versions:
        raise KeyError(f"no prompt template named {name!r}; have {sorted(available())}")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise KeyError(f"prompt {name!r} has no version {chosen}; have {list(versions)}")
    messages = tuple(
        ChatMessage(role=role, content=template.substitute(variables))
        for role, template in _template(name, chosen)
    )
    return RenderedPrompt(version=f"{name}_v{chosen}", messages=messages)


Piece = tuple[Literal["text", "var"], str]


def pieces(name: str, version: int | None = None) -> tuple[tuple[Role, tuple[Piece, ...]], ...]:
    """Each section of template ``name`` as its literal texts and variable names in order,
    for callers that fill a whole column of values at once; joining the pieces with the
    values gives exactly what :func:`render` gives."""
    versions = available()[name]
    chosen = versions[-1] if version is None else version
    out: list[tuple[Role, tuple[Piece, ...]]] = []
    for role, template in _template(name, chosen):
        parts: list[Piece] = []
        at = 0
        for m in template.pattern.finditer(template.template):
            parts.append(("text", template.template[at:m.start()]))
            if m["escaped"] is not None:
                parts.append(("text", template.delimiter))
            elif m["named"] or m["braced"]:
                parts.append(("var", m["named"] or m["braced"]))
            else:
                raise ValueError(f"prompt {name}_v{chosen}: invalid placeholder at {m.start()}")
            at = m.end()
        parts.append(("text", template.template[at:]))
        out.append((role, tuple(p for p in parts if p != ("text", ""))))
    return tuple(out)
