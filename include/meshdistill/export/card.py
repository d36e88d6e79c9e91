"""The dataset card (``README.md``) of an export, in the Hugging Face format, and its plots.

The YAML header names one config per format with its split files, so
``load_dataset(folder, "sft")`` works without arguments, and gives ``dataset_info``
features derived from the same Arrow schemas the shards are written with (the shape
``datasets`` writes: a test compares them). The body says how the data was made, credits
NLM, states the limits and shows one record per format. Plots are drawn with matplotlib's
object API (no pyplot state) and saved without metadata, so the same data gives the same
bytes; the card holds nothing of the export's id or time for the same reason.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import yaml

from meshdistill.export.schemas import JUDGE_CRITERIA, SCHEMAS

_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))
_USES = {
    "sft": "TRL `SFTTrainer` (conversational language modelling: `messages`)",
    "prompt_completion": "TRL conversational prompt-completion (loss on the completion only)",
    "dpo": "TRL `DPOTrainer` with an explicit prompt (`prompt`, `chosen`, `rejected`)",
    "alpaca": "Alpaca-style instruction tuning (`instruction`, `input`, `output`)",
    "sharegpt": "ShareGPT-style trainers (`conversations` of `from`/`value`)",
    "qca": "audits and analysis: every item with its full provenance",
}


@dataclass
class CardStats:
    """What the plots show, over the exported rows."""

    items_per_subtree: dict[str, int]
    hierarchy_scores: npt.NDArray[np.float64]
    judge_scores: dict[str, npt.NDArray[np.int8]]
    question_types: dict[str, int]
    labels: dict[str, int]
    pair_margins: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.float64))


def _feature(t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t):
        inner = _feature(t.value_type)
        return {"list": inner.get("dtype", inner.get("struct", inner))}
    names = {pa.string(): "string", pa.bool_(): "bool"}
    return {"dtype": names.get(t, str(t))}


def hf_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The ``features`` list of a card's ``dataset_info`` for ``schema``."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def size_category(n: int) -> str:
    """Hugging Face's ``size_categories`` bucket of ``n`` rows."""
    for bound, name in _SIZES:
        if n < bound:
            return name
    return "n>1T"


def _figure(width: float = 6.0, height: float = 3.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _bars(ax: Any, counts: Mapping[str, int], title: str) -> None:
    names = list(counts)
    ax.bar(range(len(names)), [counts[n] for n in names], color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0)
    ax.set_title(title)


def render_plots(stats: CardStats) -> dict[str, bytes]:
    """PNG bytes by path under the export folder."""
    plots: dict[str, bytes] = {}
    fig = _figure()
    _bars(fig.add_subplot(), stats.items_per_subtree, "Items per MeSH subtree")
    plots["plots/items_per_subtree.png"] = _png(fig)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(stats.hierarchy_scores, bins=20, range=(0, 1), color="#55A868")
    ax.set_title("MeSH-hierarchy score of the items")
    ax.set_xlabel("hierarchy score")
    plots["plots/hierarchy_scores.png"] = _png(fig)
    fig = _figure(8.0, 2.6)
    for i, c in enumerate(JUDGE_CRITERIA):
        ax = fig.add_subplot(1, len(JUDGE_CRITERIA), i + 1)
        values = stats.judge_scores.get(c, np.zeros(0, np.int8))
        ax.bar(range(1, 6), np.bincount(values.astype(np.int64), minlength=6)[1:6],
               color="#C44E52")
        ax.set_xticks(range(1, 6))
        ax.set_title(c, fontsize=9)
    plots["plots/judge_scores.png"] = _png(fig)
    fig = _figure(8.0, 3.0)
    _bars(fig.add_subplot(1, 2, 1), stats.question_types, "Question types")
    _bars(fig.add_subplot(1, 2, 2), stats.labels, "yes/no/maybe labels (yesno items)")
    plots["plots/types_and_labels.png"] = _png(fig)
    if len(stats.pair_margins):
        fig = _figure()
        ax = fig.add_subplot()
        ax.hist(stats.pair_margins, bins=20, color="#8172B2")
        ax.set_title("Preference pairs: hierarchy-score margin")
        plots["plots/pair_margins.png"] = _png(fig)
    return plots


def _header(manifest: dict[str, Any]) -> dict[str, Any]:
    formats: dict[str, dict[str, int]] = manifest["formats"]
    configs, infos = [], []
    for i, fmt in enumerate(f for f in SCHEMAS if f in formats):
        files = manifest["data_files"][fmt]
        config: dict[str, Any] = {"config_name": fmt, "data_files": [
            {"split": split, "path": paths} for split, paths in files.items()]}
        if i == 0:
            config["default"] = True
        configs.append(config)
        infos.append({"config_name": fmt, "features": hf_features(SCHEMAS[fmt]),
                      "splits": [{"name": s, "num_examples": n}
                                 for s, n in formats[fmt].items()]})
    total = max([sum(v.values()) for v in formats.values()] or [0])
    return {
        "pretty_name": "meshdistill biomedical QA (KAILIN, MeSH-guided)",
        "license": "other", "license_name": "pubmed-and-nlm-terms",
        "license_link": "https://www.nlm.nih.gov/databases/download/terms_and_conditions.html",
        "language": ["en"], "task_categories": ["question-answering", "text-generation"],
        "size_categories": [size_category(total)],
        "tags": ["biomedical", "pubmed", "mesh", "synthetic", "kailin", "medical"],
        "configs": configs, "dataset_info": infos,
    }


def _clip(value: Any, n: int = 240) -> Any:
    if isinstance(value, str):
        return value if len(value) <= n else value[:n] + "…"
    if isinstance(value, list):
        return [_clip(v, n) for v in value[:3]] + (["…"] if len(value) > 3 else [])
    if isinstance(value, dict):
        return {k: _clip(v, n) for k, v in value.items()}
    return value


def render_card(manifest: dict[str, Any], stats: CardStats, samples: dict[str, dict[str, Any]],
                plots: Iterable[str]) -> str:
    """The card's text; depends on nothing but the manifest's data fields and ``stats``."""
    p = manifest.get("params", {})
    counts = manifest.get("counts", {})
    lines = ["---", yaml.safe_dump(_header(manifest), sort_keys=False).rstrip(), "---", "",
             "# meshdistill biomedical question–answer data", "",
             f"{counts.get('items', 0):,} question–context–answer items and "
             f"{counts.get('pairs', 0):,} preference pairs distilled from PubMed abstracts "
             "under the MeSH subtrees "
             f"{', '.join(sorted(stats.items_per_subtree)) or '(none)'}.", "",
             "## How it was made", "",
             "The KAILIN method (Cai et al., 2025, arXiv 2501.15108): for each abstract "
             "indexed under a subtree, two generator profiles (`domain`, guided by the "
             "article's MeSH headings and the subtree's path and scope note; `general`) "
             "write questions with a verbatim evidence sentence; full-text retrieval adds "
             "context abstracts; a MeSH-hierarchy score (Wu–Palmer similarity of the "
             "question's and the contexts' descriptors) ranks them; an LLM judge scores "
             "groundedness, relevance, clarity, informativeness and safety; a grounded answer "
             "cites its contexts. The two profiles' questions form the preference pairs.", "",
             f"- backends: {', '.join(manifest.get('backends', [])) or '-'}; models: "
             f"{', '.join(manifest.get('models', [])) or '-'}",
             f"- prompt versions: {', '.join(manifest.get('prompt_versions', [])) or '-'}",
             f"- MeSH year: {manifest.get('mesh_year') or 'unknown'}",
             f"- selection: minimum hierarchy score {p.get('min_hierarchy')}, minimum judge "
             f"scores {json.dumps(p.get('min_judge'))}, question types "
             f"{', '.join(p.get('question_types', []))}, closed book {p.get('closed_book')}",
             f"- splits by a hash of the source PMID (seed {p.get('seed')}), ratios "
             f"{p.get('split_ratios')}; near-duplicate threshold {p.get('near_dup_threshold')}",
             "", "## Rows", "", "| format | use | " + " | ".join(
                 ("train", "validation", "test")) + " |", "|---|---|---|---|---|"]
    for fmt, splits in manifest.get("formats", {}).items():
        lines.append(f"| `{fmt}` | {_USES.get(fmt, '')} | " + " | ".join(
            f"{splits.get(s, 0):,}" for s in ("train", "validation", "test")) + " |")
    removed = {k: v for k, v in manifest.get("removed", {}).items() if v}
    lines += ["", "Removed before writing: " + (", ".join(
        f"{k.replace('_', ' ')} {v:,}" for k, v in removed.items()) or "nothing") + "."]
    for bench, n in manifest.get("decontamination", {}).items():
        lines.append(f"Benchmark `{bench}`: {n.get('pmid', 0):,} rows shared a PMID, "
                     f"{n.get('ngram', 0):,} a 13-word run with its questions.")
    lines += ["", "## Load it", "", "```python", "from datasets import load_dataset", "",
              'ds = load_dataset("path/to/this/folder", "sft")  # or prompt_completion, dpo, '
              "alpaca, sharegpt, qca", 'print(ds["train"][0])', "```", ""]
    lines += [f"![{name}]({name})" for name in plots] + [""]
    lines += ["## Sample records", ""]
    for fmt in SCHEMAS:
        if fmt in samples:
            lines += [f"`{fmt}`:", "", "```json",
                      json.dumps(_clip(samples[fmt]), indent=2, ensure_ascii=False), "```", ""]
    lines += [
        "## Known limitations", "",
        "- Questions, judgements and answers are written by a language model: they can be "
        "wrong, and the judge and the grounding checks filter but do not prove them.",
        "- Labels of yes/no questions are imbalanced in literature-derived data (PubMedQA's "
        "automatically labelled PQA-A is about 92.8% yes); see the label plot and "
        "`max_label_share`.",
        "- The MeSH-hierarchy score is a heuristic of topical fit, not of correctness.",
        "- Only titles and abstracts are used, not full texts; English only.", "",
        "## Source data and terms", "",
        "Abstracts and citations come from PubMed/MEDLINE and subject headings from Medical "
        f"Subject Headings (MeSH {manifest.get('mesh_year') or ''}), courtesy of the U.S. "
        "National Library of Medicine (NLM). This dataset contains data modified from those "
        "sources: it is not NLM's own, and NLM does not endorse it. The copyright of the "
        "abstracts stays with their publishers; use this data under NLM's terms and "
        "conditions and the abstracts' own terms.", ""]
    return "\n".join(lines)
