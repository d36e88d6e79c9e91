"""The dataset card (``README.md``) of an export, in the Hugging Face format, and its plots.

Contract: :func:`render_card` turns a manifest, :class:`CardStats`, one sample record per
format and the plot paths into the card's text; :func:`render_plots` turns the stats into
PNG bytes by path under the export folder. Both are pure: the same data and settings give
byte-identical output, so nothing of the export's id or time enters the card and the PNGs
carry no metadata.

Reason: the YAML header is what ``datasets`` reads. Its ``configs`` name one config per
format with its shard files, so ``load_dataset(folder, "sft")`` needs no other argument;
its ``dataset_info`` gives the features (in ``datasets``' YAML shape, derived from the same
Arrow schemas the shards are written with) and the split sizes, which ``datasets`` checks
on load. The body says how the data was made, what was removed, credits NLM as its terms
ask, names the limits and shows one record per format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import yaml

from meshdistill.export.schemas import FORMATS, JUDGE_CRITERIA, SCHEMAS
from meshdistill.export.settings import SPLITS
from meshdistill.plotting import figure, to_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "CardStats", "hf_features", "render_card", "render_plots",
           "size_category"]

KAILIN = "https://arxiv.org/abs/2501.15108"
NLM_TERMS = "https://www.nlm.nih.gov/databases/download.html"
MESH_TERMS = "https://www.nlm.nih.gov/databases/download/terms_and_conditions_mesh.html"
CLIP_CHARS = 300
CLIP_ITEMS = 4
MAX_BARS = 30
"""Subtrees beyond the largest 30 are drawn as one "other" bar, so the plot stays legible."""

PLOTS = {
    "plots/items_per_subtree.png": "Items per MeSH subtree",
    "plots/hierarchy_scores.png": "Histogram of the MeSH-hierarchy score of the items",
    "plots/judge_scores.png": "Judge scores 1-5 per criterion",
    "plots/types_and_labels.png": "Question types and yes/no/maybe labels",
    "plots/pair_margins.png": "Histogram of the preference pairs' hierarchy-score margin",
}
"""Every plot :func:`render_plots` can draw, in card order, with its alt text."""

_USES = {
    "sft": "TRL `SFTTrainer`: conversational language modelling on `messages`",
    "prompt_completion": "TRL `SFTTrainer` on `prompt` / `completion`: loss on the "
                         "completion only",
    "dpo": "TRL `DPOTrainer`: preference data with an explicit `prompt`, `chosen`, "
           "`rejected`",
    "alpaca": "Alpaca-style trainers: `instruction`, `input`, `output`",
    "sharegpt": "ShareGPT-style trainers: `conversations` of `from` / `value` turns",
    "qca": "audits and analysis: every item with its contexts, scores and provenance",
}
_REASONS = {
    "contamination_pmid": "its source or a context article is an article of a benchmark",
    "contamination_ngram": "its question shares a 13-word run with a benchmark question",
    "exact_duplicate": "its question equals a better-scored one after normalisation",
    "near_duplicate": "its question's estimated word 5-gram Jaccard similarity to a "
                      "better-scored one reaches the near-duplicate threshold (MinHash LSH)",
    "cross_split_context": "a context is the source article of another split",
    "cap_subtree": "over the cap per subtree (the best-scored kept)",
    "cap_type": "over the cap per question type (the best-scored kept)",
    "cap_label": "over the cap on the majority yes/no/maybe label",
}
_SIZES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M",
          "100M<n<1B", "1B<n<10B", "10B<n<100B", "100B<n<1T")
_FLOATS = {"halffloat": "float16", "float": "float32", "double": "float64"}
_COLOURS = ("#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD")


@dataclass
class CardStats:
    """What the plots show, over the exported items and pairs."""

    items_per_subtree: dict[str, int]
    hierarchy_scores: npt.NDArray[np.float64]
    judge_scores: dict[str, npt.NDArray[np.int8]]
    """Criterion (``JUDGE_CRITERIA``) to the 1-5 scores of the items."""
    question_types: dict[str, int]
    labels: dict[str, int]
    """yes/no/maybe counts of ``yesno`` items; an empty key (no label) is ignored."""
    pair_margins: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.float64))


# --- dataset_info features ------------------------------------------------------------


def _dtype(t: pa.DataType) -> str:
    """``datasets``' name of a plain Arrow type: Arrow's own, but floats by width, dates
    without their unit, and a dictionary as its values."""
    if pa.types.is_dictionary(t):
        return _dtype(t.value_type)
    if pa.types.is_map(t) or pa.types.is_union(t) or pa.types.is_nested(t):
        raise TypeError(f"no dataset card feature for Arrow type {t}")
    if pa.types.is_date(t):
        return str(t).split("[", 1)[0]
    return _FLOATS.get(str(t), str(t))


def _feature(t: pa.DataType) -> dict[str, Any]:
    """One type in ``datasets``' YAML shape: a list of a plain type or of a struct is
    written inline (``list: int64``, ``list: [fields]``), as ``datasets`` writes it."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _feature(t.value_type)
        short = inner["dtype"] if list(inner) == ["dtype"] else inner.get("struct", inner)
        out: dict[str, Any] = {"large_list" if pa.types.is_large_list(t) else "list": short}
        if pa.types.is_fixed_size_list(t):
            out["length"] = t.list_size
        return out
    return {"dtype": _dtype(t)}


def hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The ``features`` list of a card's ``dataset_info`` for ``schema``: what
    ``datasets.Features.from_arrow_schema(schema)._to_yaml_list()`` gives, without
    needing ``datasets`` at run time."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def size_category(n: int) -> str:
    """Hugging Face's ``size_categories`` bucket of ``n`` rows: ``n<1K`` below 1,000,
    ``1K<n<10K`` from 1,000 to 9,999, and so on up to ``n>1T``."""
    if n < 0:
        raise ValueError(f"a row count cannot be negative: {n}")
    for power, name in enumerate(_SIZES, start=3):
        if n < 10**power:
            return name
    return "n>1T"


# --- plots ----------------------------------------------------------------------------


def _whole(axis: Any) -> None:
    """Counts are whole numbers: no 2.5 on their axis."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _bars(fig: Figure, position: int, columns: int, counts: Mapping[str, int],
          title: str, colour: str) -> None:
    ax = fig.add_subplot(1, columns, position)
    names = list(counts)
    ax.bar(range(len(names)), [counts[n] for n in names], color=colour)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0,
                  ha="right" if len(names) > 4 else "center")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("items")
    _whole(ax.yaxis)


def _top(counts: Mapping[str, int], n: int) -> dict[str, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = dict(ranked[:n])
    if len(ranked) > n:
        top[f"other ({len(ranked) - n})"] = sum(v for _, v in ranked[n:])
    return top


def _plot_subtrees(stats: CardStats) -> Figure | None:
    counts = _top({k: v for k, v in stats.items_per_subtree.items() if v}, MAX_BARS)
    if not counts:
        return None
    fig = figure(6.4, 1.4 + 0.28 * len(counts))
    ax = fig.add_subplot()
    names = list(counts)[::-1]  # largest on top
    ax.barh(names, [counts[n] for n in names], color=_COLOURS[0])
    ax.set_xlabel("items")
    _whole(ax.xaxis)
    ax.set_title(f"Items per MeSH subtree ({sum(counts.values()):,})", fontsize=10)
    return fig


def _histogram(values: npt.NDArray[np.float64], title: str, xlabel: str, colour: str,
               span: tuple[float, float] | None) -> Figure | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    fig = figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.hist(values, bins=20, range=span, color=colour)
    ax.set_title(f"{title} (n={len(values):,}, median {np.median(values):.3f})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    _whole(ax.yaxis)
    return fig


def _plot_hierarchy(stats: CardStats) -> Figure | None:
    return _histogram(stats.hierarchy_scores, "MeSH-hierarchy score of the items",
                      "hierarchy score", _COLOURS[1], (0.0, 1.0))


def _plot_margins(stats: CardStats) -> Figure | None:
    return _histogram(stats.pair_margins, "Preference pairs: chosen minus rejected score",
                      "hierarchy-score margin", _COLOURS[3], None)


def _plot_judge(stats: CardStats) -> Figure | None:
    scores = {c: np.asarray(stats.judge_scores.get(c, ()), dtype=np.int64)
              for c in JUDGE_CRITERIA}
    if not any(len(v) for v in scores.values()):
        return None
    fig = figure(8.8, 2.6)
    axes = fig.subplots(1, len(scores), sharey=True)
    for ax, (criterion, values) in zip(axes, scores.items(), strict=True):
        values = values[(values >= 1) & (values <= 5)]
        ax.bar(range(1, 6), np.bincount(values, minlength=6)[1:6], color=_COLOURS[2])
        ax.set_xticks(range(1, 6))
        ax.set_title(criterion, fontsize=9)
        _whole(ax.yaxis)
    axes[0].set_ylabel("items")
    return fig


def _plot_mix(stats: CardStats) -> Figure | None:
    types = {k: v for k, v in sorted(stats.question_types.items()) if v}
    labels = {k: v for k, v in sorted(stats.labels.items()) if k and v}
    if labels:  # all three drawn, zeros too, so an imbalance is visible as such
        labels = {"yes": 0, "no": 0, "maybe": 0} | labels
    panels = [(c, t, colour) for c, t, colour in (
        (types, "Question types", _COLOURS[0]),
        (labels, "Labels of yesno items", _COLOURS[4])) if c]
    if not panels:
        return None
    fig = figure(4.2 * len(panels), 3.2)
    for i, (counts, title, colour) in enumerate(panels, start=1):
        _bars(fig, i, len(panels), counts, title, colour)
    return fig


_DRAW: dict[str, Callable[[CardStats], Figure | None]] = {
    "plots/items_per_subtree.png": _plot_subtrees,
    "plots/hierarchy_scores.png": _plot_hierarchy,
    "plots/judge_scores.png": _plot_judge,
    "plots/types_and_labels.png": _plot_mix,
    "plots/pair_margins.png": _plot_margins,
}


def render_plots(stats: CardStats) -> dict[str, bytes]:
    """PNG bytes by path under the export folder; a plot with nothing to show is left
    out. Drawn under matplotlib's default style, whatever the user's matplotlibrc says,
    so the same stats give the same bytes."""
    import matplotlib
    import matplotlib.style

    out: dict[str, bytes] = {}
    with matplotlib.style.context("default"), matplotlib.rc_context({"font.size": 9}):
        for path, draw in _DRAW.items():
            fig = draw(stats)
            if fig is not None:
                out[path] = to_png(fig)
    return out


# --- front matter ---------------------------------------------------------------------


def _split_order(names: Iterable[str]) -> list[str]:
    names = list(names)
    return [s for s in SPLITS if s in names] + sorted(n for n in names if n not in SPLITS)


def _data_files(manifest: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Format to split to shard paths, for the formats with a schema and any file, in
    ``FORMATS`` order."""
    files = manifest.get("data_files") or {}
    out: dict[str, dict[str, list[str]]] = {}
    for fmt in (f for f in FORMATS if f in files and f in SCHEMAS):
        splits = {s: list(files[fmt][s]) for s in _split_order(files[fmt]) if files[fmt][s]}
        if splits:
            out[fmt] = splits
    return out


def _shard_sum(manifest: Mapping[str, Any], fmt: str, split: str, key: str) -> int | None:
    primary = manifest.get("primary_file_format")
    shards = [sh for sh in manifest.get("shards") or () if sh.get("format") == fmt
              and sh.get("split") == split and sh.get("file_format", primary) == primary]
    return sum(int(sh.get(key, 0)) for sh in shards) if shards else None


def _rows(manifest: Mapping[str, Any], fmt: str, split: str) -> int | None:
    rows = (manifest.get("formats") or {}).get(fmt, {}).get(split)
    return int(rows) if rows is not None else _shard_sum(manifest, fmt, split, "rows")


def _dataset_info(manifest: Mapping[str, Any], fmt: str, splits: list[str]) -> dict[str, Any]:
    """One config's ``dataset_info``. ``num_bytes`` is the bytes of the split's shard files
    (the in-memory Arrow size is unknown without reading them): ``datasets`` warns about a
    split without it, and checks only ``num_examples`` against the files."""
    info: dict[str, Any] = {"config_name": fmt, "features": hf_features(SCHEMAS[fmt])}
    rows = {s: _rows(manifest, fmt, s) for s in splits}
    if all(n is not None for n in rows.values()):
        sizes = {s: _shard_sum(manifest, fmt, s, "bytes") or 0 for s in splits}
        info["splits"] = [{"name": s, "num_bytes": sizes[s], "num_examples": rows[s]}
                          for s in splits]
        info["download_size"] = info["dataset_size"] = sum(sizes.values())
    return info


def _subtree_names(manifest: Mapping[str, Any]) -> list[str]:
    chosen = (manifest.get("params") or {}).get("subtrees") or []
    return list(chosen) or sorted((manifest.get("counts") or {}).get("by_subtree") or {})


def _pretty_name(manifest: Mapping[str, Any]) -> str:
    names = _subtree_names(manifest)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return "meshdistill biomedical QA" + (f" (MeSH {shown})" if shown else "")


def _front_matter(manifest: Mapping[str, Any],
                  files: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    configs = []
    for i, (fmt, splits) in enumerate(files.items()):
        config: dict[str, Any] = {"config_name": fmt}
        if i == 0:
            config["default"] = True
        config["data_files"] = [{"split": s, "path": p} for s, p in splits.items()]
        configs.append(config)
    infos = [_dataset_info(manifest, fmt, list(splits)) for fmt, splits in files.items()]
    largest = max((sum(_rows(manifest, f, s) or 0 for s in splits)
                   for f, splits in files.items()), default=0)
    tags = ["biomedical", "medical", "pubmed", "mesh", "synthetic", "kailin", "meshdistill"]
    return {
        "pretty_name": _pretty_name(manifest),
        "language": ["en"],
        "license": "other",
        "license_name": "pubmed-abstracts-nlm-terms",
        "license_link": NLM_TERMS,
        "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated", "found"],
        "multilinguality": ["monolingual"],
        "task_categories": ["question-answering", "text-generation"],
        "size_categories": [size_category(largest)],
        "tags": tags + [t for t in ("sft", "dpo") if t in files],
        "configs": configs,
        "dataset_info": infos,
    }


# --- body -----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _listing(values: Iterable[Any]) -> str:
    shown = [f"`{v}`" for v in values]
    return ", ".join(shown) if shown else "not recorded"


def _num(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else str(n)


def _value(v: Any) -> str:
    """A setting as a reader writes it: yes/no, ``a / b / c``, none."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list | tuple):
        return " / ".join(map(str, v))
    return "none" if v is None else str(v)


def _intro(manifest: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    counts = manifest.get("counts") or {}
    subtrees = _subtree_names(manifest)
    commit = manifest.get("git_commit")
    made = f"meshdistill {manifest.get('package_version', 'unknown')}" + (
        f" (commit `{commit}`)" if commit else "")
    return (
        f"# {_pretty_name(manifest)}\n\n"
        "Biomedical question–answer training data distilled from PubMed abstracts and "
        f"guided by the MeSH hierarchy, after the KAILIN method ([Cai et al., 2025]({KAILIN}))."
        f" {_num(counts.get('items', 0))} question–context–answer items and "
        f"{_num(counts.get('pairs', 0))} preference pairs over the MeSH subtrees "
        f"{_listing(subtrees)}, in the formats {_listing(files)}. The questions, answers, "
        f"labels and judgements are machine-generated; the contexts are PubMed abstracts. "
        f"Made by {made}.")


def _method() -> str:
    return (
        "## How it was made\n\n"
        "1. **Two generator profiles** write questions about each abstract indexed under a "
        "subtree: `domain`, guided by the article's MeSH headings and the subtree's MeSH path "
        "and scope note, and `general`, from the abstract alone. Each question quotes a "
        "verbatim evidence sentence of the abstract, or is rejected.\n"
        "2. **Retrieval**: full-text (or vector) search over the ingested abstracts finds "
        "candidate contexts; the source abstract is always one of them.\n"
        "3. **MeSH-hierarchy score**: Wu–Palmer similarity on MeSH tree numbers, averaged "
        "over best matches, between the question's, the source's and the contexts' "
        "descriptors; it ranks the contexts and rejects off-topic items.\n"
        "4. **LLM judge**: groundedness, relevance, clarity, informativeness and safety, each "
        "scored 1–5 with a rationale.\n"
        "5. **Grounded answer** from the chosen contexts, citing only their PMIDs, its evidence "
        "sentences checked against them; a `yesno` answer carries its yes/no/maybe label.\n"
        "6. **Preference pairs**: at each position the two profiles' questions, the one with "
        "the higher hierarchy score chosen: KAILIN's alignment of a question generator with "
        "the MeSH hierarchy.")


def _judge_minimums(params: Mapping[str, Any]) -> str:
    active = {c: n for c, n in (params.get("min_judge") or {}).items() if n and n > 1}
    return ", ".join(f"{c} ≥ {n}" for c, n in active.items()) or "none (every score)"


def _settings(manifest: Mapping[str, Any]) -> str:
    p = manifest.get("params") or {}
    templates = manifest.get("export_templates") or {}
    caps = {k: p.get(k) for k in ("max_per_subtree", "max_per_type", "max_label_share")
            if p.get(k) is not None}
    rows = [
        ["LLM backends", _listing(manifest.get("backends") or ())],
        ["models", _listing(manifest.get("models") or ())],
        ["prompt versions", _listing(manifest.get("prompt_versions") or ())],
        ["export templates", _listing(templates.values())],
        ["MeSH year", manifest.get("mesh_year") or "not recorded"],
        ["subtrees", _listing(p.get("subtrees") or ()) if p.get("subtrees") else "all"],
        ["question types", _listing(p.get("question_types") or ())],
        ["minimum hierarchy score", _value(p.get("min_hierarchy"))],
        ["minimum judge scores", _judge_minimums(p)],
        ["closed book (no contexts in prompts)", _value(p.get("closed_book"))],
        ["near-duplicate threshold", _value(p.get("near_dup_threshold"))],
        ["strict splits", _value(p.get("strict_splits"))],
        ["split ratios (train / validation / test)", _value(p.get("split_ratios"))],
        ["split seed", _value(p.get("seed", manifest.get("seed")))],
        ["caps", ", ".join(f"{k} {v}" for k, v in caps.items()) or "none"],
        ["file format", manifest.get("primary_file_format", p.get("file_format", "?"))],
    ]
    return ("### This export\n\nThe distillation's own settings (its thresholds at "
            "generation time) are in each `qca` row's `params`; the export selected and "
            "cleaned with these:\n\n" + _table(["setting", "value"], rows))


def _contents(manifest: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> str:
    splits = _split_order({s for v in files.values() for s in v})
    rows = []
    for fmt, present in files.items():
        n = [(_rows(manifest, fmt, s) or 0) if s in present else 0 for s in splits]
        rows.append([f"`{fmt}`", _USES.get(fmt, ""), *map(_num, n), _num(sum(n))])
    counts = manifest.get("counts") or {}
    by = [f"{name}: " + (", ".join(f"{k or 'none'} {_num(v)}" for k, v in d.items()) or "-")
          for name, d in (("question type", counts.get("by_type") or {}),
                          ("label", counts.get("by_label") or {}))]
    return ("## Contents\n\nRows per format and split. Splits are by a hash of the source "
            "PMID, so an article's items are all in one split.\n\n"
            + _table(["config", "use", *splits, "total"], rows)
            + "\n\nItems by " + "; by ".join(by) + ".")


def _cleaning(manifest: Mapping[str, Any]) -> str:
    threshold = (manifest.get("params") or {}).get("near_dup_threshold")
    removed = {k: v for k, v in (manifest.get("removed") or {}).items() if v}
    text = ["## Cleaning\n\nBefore writing, items (and preference pairs, on both "
            "questions) were decontaminated against benchmarks, deduplicated exactly and by "
            f"MinHash near-duplicate detection (threshold {threshold}), split and capped; "
            "wherever one of several rows is kept it is the best-scored."]
    if removed:
        text.append(_table(["reason", "removed", "why"], [
            [f"`{k}`", _num(v), _REASONS.get(k, k.replace("_", " "))]
            for k, v in removed.items()]))
    else:
        text.append("Nothing was removed.")
    names = [b["name"] for b in manifest.get("benchmarks") or () if b.get("name")]
    if names:
        text.append(f"Benchmarks checked: {_listing(names)}.")
    contamination = manifest.get("decontamination") or {}
    if contamination:
        text.append(_table(["benchmark", "shared PMID", "shared 13-word run"], [
            [f"`{b}`", _num(n.get("pmid", 0)), _num(n.get("ngram", 0))]
            for b, n in sorted(contamination.items())]))
    return "\n\n".join(text)


def _plots_section(plots: Iterable[str]) -> str:
    chosen = set(plots)
    ordered = [p for p in PLOTS if p in chosen] + sorted(chosen - set(PLOTS))
    if not ordered:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{PLOTS.get(p, p)}]({p})" for p in ordered)


def _usage(files: Mapping[str, Any]) -> str:
    first = next(iter(files), "sft")
    return (
        "## Usage\n\n```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("path/to/export", "{first}")  # configs: '
        f'{", ".join(files)}\nprint(ds)\n'
        'good = ds["train"].filter(lambda r: r["metadata"]["hierarchy_score"] >= 0.5)\n```\n\n'
        "With TRL: `sft` is a conversational language-modelling dataset (`messages`) for "
        "`SFTTrainer`; `prompt_completion` is conversational prompt–completion data, on which "
        "`SFTTrainer` computes the loss on the completion only; `dpo` is preference data with "
        "an explicit prompt (`prompt`, `chosen`, `rejected`) for `DPOTrainer`. The `metadata` "
        "column of every format holds the source PMID, subtree, question type, label and "
        "scores, for filtering without a join.")


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CLIP_CHARS:
        return f"{value[:CLIP_CHARS]}… [{len(value) - CLIP_CHARS:,} more characters]"
    if isinstance(value, list):
        extra = [f"… [{len(value) - CLIP_ITEMS} more]"] if len(value) > CLIP_ITEMS else []
        return [_clip(v) for v in value[:CLIP_ITEMS]] + extra
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    return value


def _fenced(text: str, language: str) -> str:
    """A code block whose fence is longer than any backtick run inside, so none closes it."""
    runs = re.findall(r"`+", text)
    fence = "`" * max([3, *(len(r) + 1 for r in runs)])
    return f"{fence}{language}\n{text}\n{fence}"


def _samples(samples: Mapping[str, Mapping[str, Any]], files: Mapping[str, Any]) -> str:
    shown = [f for f in files if samples.get(f)]
    if not shown:
        return ""
    blocks = [f"### `{fmt}`\n\n" + _fenced(json.dumps(
        _clip(dict(samples[fmt])), indent=2, ensure_ascii=False, default=str), "json")
        for fmt in shown]
    return ("## Sample records\n\nOne record per format; strings longer than "
            f"{CLIP_CHARS} characters and lists longer than {CLIP_ITEMS} items are clipped "
            "here, not in the data.\n\n" + "\n\n".join(blocks))


def _terms(manifest: Mapping[str, Any]) -> str:
    year = manifest.get("mesh_year")
    mesh = f"{year} MeSH" if year else "MeSH (the MeSH year was not recorded for this export)"
    return (
        "## Source data, attribution and terms\n\n"
        "This dataset is derived from data of the **U.S. National Library of Medicine (NLM)**, "
        "the creator, maintainer and provider of PubMed/MEDLINE and of the Medical Subject "
        f"Headings. Vocabulary version: **{mesh}**. The PubMed records are those ingested when "
        "the data were distilled; NLM revises records, so these need not reflect the most "
        "current data available from NLM.\n\n"
        "The data are **modified**: abstracts were selected by MeSH subtree and shown as "
        "contexts, questions, answers, labels and judgements were generated from them by "
        "language models, MeSH headings and tree numbers were used to score and select the "
        "items, and duplicates and benchmark overlaps were removed. These modified data are "
        "not NLM's own data, and NLM does not endorse them or any product made with them.\n\n"
        f"NLM's terms apply: [copyright and downloading NLM data]({NLM_TERMS}) and the "
        f"[terms and conditions for MeSH]({MESH_TERMS}). The abstracts (in the contexts and "
        "in what was generated from them) may be protected by copyright, which stays with "
        "their publishers or authors; NLM does not hold it. No licence is granted here beyond "
        "what those terms and the copyright holders allow (`license: other`); check them for "
        "your use. Every record keeps its source PMID (`metadata.source_pmid`), so the "
        "original is at `https://pubmed.ncbi.nlm.nih.gov/<PMID>/`.")


def _label_share(manifest: Mapping[str, Any]) -> str:
    labels = {k: v for k, v in ((manifest.get("counts") or {}).get("by_label") or {}).items()
              if k and v}
    total = sum(labels.values())
    if not total:
        return ""
    mix = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in labels.items())
    return f" In this export: {mix} of {_num(total)} labelled `yesno` items."


def _limitations(manifest: Mapping[str, Any]) -> str:
    backends = list(manifest.get("backends") or ())
    lines = [
        "- **Synthetic.** Questions, answers, labels and judgements are written by a language "
        "model. They can be wrong or unsupported; the evidence checks, the citation checks and "
        "the judge filter them but do not prove them. Not for clinical use.",
        "- **Label imbalance.** Answers to yes/no questions about published findings lean to "
        "*yes* (PubMedQA's automatically labelled PQA-A is about 92.8% yes)."
        + _label_share(manifest) + " The export's `max_label_share` caps the majority label.",
        "- **The hierarchy score is a heuristic** of topical agreement in MeSH, computed from "
        "descriptor names found verbatim in the question; it says nothing about correctness.",
        "- **Abstracts only**: titles and abstracts, no full texts; retrieval searched only the "
        "abstracts ingested for the chosen subtrees, and the data are English only.",
    ]
    if "offline" in backends:
        share = "All" if backends == ["offline"] else "Some"
        lines.append(f"- **Offline baseline.** {share} rows come from the `offline` backend, a "
                     "deterministic extractive baseline (no language model), meant for "
                     "testing the pipeline rather than for training.")
    return "## Known limitations\n\n" + "\n".join(lines)


def _citation() -> str:
    return ("## Citation\n\nThe method: Cai et al. (2025), KAILIN, "
            f"[arXiv:2501.15108]({KAILIN}). Please also credit NLM as above.")


def _scores(stats: CardStats) -> str:
    h = np.asarray(stats.hierarchy_scores, dtype=np.float64)
    h = h[np.isfinite(h)]
    parts = []
    if len(h):
        q1, q2, q3 = np.quantile(h, [0.25, 0.5, 0.75])
        parts.append(f"MeSH-hierarchy score median {q2:.3f} (quartiles {q1:.3f}–{q3:.3f})")
    means = [f"{c} {np.mean(v):.2f}" for c in JUDGE_CRITERIA
             if len(v := np.asarray(stats.judge_scores.get(c, ())))]
    if means:
        parts.append("mean judge scores " + ", ".join(means))
    m = np.asarray(stats.pair_margins, dtype=np.float64)
    if len(m := m[np.isfinite(m)]):
        parts.append(f"preference-pair margin median {np.median(m):.3f}")
    return ("Scores of what was exported: " + "; ".join(parts) + ".") if parts else ""


def render_card(manifest: dict[str, Any], stats: CardStats, samples: dict[str, dict[str, Any]],
                plots: Iterable[str]) -> str:
    """The card's text. It uses the manifest's data and settings and ``stats`` only (never
    ``export_id`` or ``created_at``), so re-exporting the same data gives the same bytes."""
    files = _data_files(manifest)
    header = yaml.safe_dump(_front_matter(manifest, files), sort_keys=False,
                            allow_unicode=True, width=100)
    sections = [_intro(manifest, files), _method(), _settings(manifest),
                _contents(manifest, files), _scores(stats), _cleaning(manifest),
                _plots_section(plots), _usage(files), _samples(samples, files),
                _terms(manifest), _limitations(manifest), _citation()]
    return f"---\n{header}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"
