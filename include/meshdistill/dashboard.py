"""The dashboard's pages and plots, from :func:`meshdistill.status.subtree_report` figures.

Plain functions of the report (no database, no web framework): the Airflow plugin
serves them, and ``meshdistill status --json`` carries the very same figures. Pages are
Jinja templates with autoescaping, since questions and answers are model output.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from meshdistill.plotting import figure, to_png

_TEMPLATES = Environment(loader=PackageLoader("meshdistill", "templates"),
                         autoescape=select_autoescape(default=True), trim_blocks=True,
                         lstrip_blocks=True)
_TEMPLATES.filters["pct"] = lambda v: "–" if v is None else f"{v:.0%}"
_TEMPLATES.filters["num"] = lambda v: f"{v:,}"


def overview_page(status: dict[str, Any]) -> str:
    """Per subtree: articles, watermark, candidates by state, acceptance, top reasons,
    LLM calls, tokens and cost; the latest export; the plots."""
    return _TEMPLATES.get_template("dashboard.html").render(
        status=status, subtrees=status["subtrees"], latest=status["exports"]["latest"])


def items_page(items: list[dict[str, Any]], subtrees: list[str], qtypes: list[str],
               subtree: str | None, qtype: str | None) -> str:
    """Sample accepted items with their scores, evidence and answer, with the filter form."""
    return _TEMPLATES.get_template("items.html").render(
        items=items, subtrees=subtrees, qtypes=qtypes, subtree=subtree, qtype=qtype)


def subtree_plot(subtrees: dict[str, dict[str, Any]]) -> bytes:
    """PNG: candidates by state and acceptance rate per subtree, beside the LLM calls (with
    tokens and cost) each subtree's runs paid for: what a person compares at a glance
    rather than in the table."""
    names = list(subtrees)
    fig = figure(10, 3.6)
    states, cost = fig.subplots(1, 2)
    if not names:
        for ax in (states, cost):
            ax.text(0.5, 0.5, "nothing ingested or distilled yet", ha="center", va="center")
            ax.set_axis_off()
    else:
        bottom = [0] * len(names)
        colours = {"accepted": "#2e7d32", "rejected": "#ef6c00", "failed": "#c62828",
                   "deferred": "#9e9e9e"}
        for state, colour in colours.items():
            values = [subtrees[n][state] for n in names]
            states.bar(names, values, bottom=bottom, color=colour, label=state)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for i, n in enumerate(names):
            rate = subtrees[n]["acceptance_rate"]
            if rate is not None:
                states.annotate(f"{rate:.0%}", (i, bottom[i]), ha="center", va="bottom",
                                fontsize=9)
        states.set_title("Candidates by state (accepted share on top)")
        states.set_ylim(0, max(bottom) * 1.3 or 1)  # room for the shares and the legend
        states.legend(fontsize=8, loc="upper center", ncols=4, frameon=False)
        calls = [subtrees[n]["llm"]["calls"] for n in names]
        cost.bar(names, calls, color="#1565c0")
        cost.set_title("LLM calls paid per subtree (tokens, cost)")
        cost.set_ylabel("calls")
        cost.set_ylim(0, max(calls) * 1.3 or 1)
        for i, n in enumerate(names):
            llm = subtrees[n]["llm"]
            cost.annotate(f"{llm['tokens']:,} tok\n${llm['cost_usd']:.2f}", (i, calls[i]),
                          ha="center", va="bottom", fontsize=8)
        for ax in (states, cost):
            ax.tick_params(axis="x", rotation=30)
    return to_png(fig)
