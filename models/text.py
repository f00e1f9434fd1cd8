"""Built-in text: CPython's language reference, for when no text is at hand (calibration, evaluation, healing)."""
from __future__ import annotations

PYDOC = "@pydoc"    # the name the CLIs (--text, --eval-text) accept for pydoc_text()


def pydoc_text() -> str:
    """The text `@pydoc` names, in every tool: the values of pydoc_data.topics.topics (CPython's language
    reference, shipped with every Python) in sorted key order, joined with blank lines ("\\n\\n", not "\\n"), i.e.
    "\\n\\n".join(topics[k] for k in sorted(topics)). It is the corpus of the SmolLM2 study and the healing runs
    (docs/smollm2.md, bench/results), so their numbers stay reproducible."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))
