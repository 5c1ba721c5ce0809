"""One look for every figure: a fixed colour and marker per method, display names, deterministic files.

A curve is a method (``pabee``) or a method's variant (``calm[classifier]``, the records' ``curve`` column).
Its style is looked up in one fixed table, never assigned by position in the figure at hand, so PABEE is
the same green in the six-method figure and in a figure of PABEE alone. Built-ins come first, in registry
order; a plugin takes the next free slot in the order the registry lists plugins, so plugins never
shift a built-in's colour. Colours: Paul Tol's "bright" scheme for the classification methods (apart
for colour-blind readers and in greyscale), his "muted" one for CALM's confidence measures, which only
share figures with ConsistentEE.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from eebench.store import atomic_write_bytes

FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class CurveStyle:
    """How one curve is drawn: ``colour`` (hex), ``marker`` (matplotlib code), ``label`` (display name)."""

    colour: str
    marker: str
    label: str


# Built-in curves in registry order, then CALM's measures; (colour, marker, display name).
_BUILTIN_STYLES: dict[str, tuple[str, str, str]] = {
    "berxit": ("#AA3377", "^", "BERxiT"),
    "calm": ("#332288", "X", "CALM"),
    "consistentee": ("#EE6677", "*", "ConsistentEE"),
    "deebert": ("#4477AA", "o", "DeeBERT"),
    "hashee": ("#66CCEE", "v", "HashEE"),
    "pabee": ("#228833", "s", "PABEE"),
    "pcee": ("#CCBB44", "D", "PCEE-BERT"),
    "trbert": ("#555555", "P", "TR-BERT"),
    "calm[softmax]": ("#332288", "X", "CALM (softmax)"),
    "calm[saturation]": ("#44AA99", "<", "CALM (saturation)"),
    "calm[classifier]": ("#882255", ">", "CALM (classifier)"),
    "calm[oracle]": ("#999933", "h", "CALM (oracle)"),
    "calm[cee_baseline]": ("#DDAA33", "p", "CALM (ConsistentEE repo)"),
}
# For plugins and unknown curves, in this order: colours no built-in uses, then markers likewise.
_SPARE_COLOURS = ("#000000", "#88CCEE", "#117733", "#CC6677", "#BBBBBB", "#994455", "#0077BB", "#EE7733")
_SPARE_MARKERS = ("d", "H", "8", "1", "2", "3", "4", "+")

TASK_NAMES = {
    "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI", "qqp": "QQP", "mnli-m": "MNLI-m",
    "mnli-mm": "MNLI-mm", "cola": "CoLA",
    "stsb": "STS-B", "mcid": "M-CID", "stackoverflow": "StackOverflow", "graded": "graded (embedded)",
    "alpaca": "Alpaca", "dolly": "Dolly", "cnndm": "CNN/DM", "xsum": "XSum",
}  # fmt: skip
BACKBONE_NAMES = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M-Instruct", "bert-base-uncased": "BERT-base",
                  "tiny-bert": "tiny BERT (test)", "tiny-roberta": "tiny RoBERTa (test)",
                  "tiny-llama": "tiny Llama (test)", "meta-llama/Llama-2-7b-hf": "Llama-2-7B"}
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "mcc": "MCC", "spearman": "Spearman", "pearson": "Pearson",
                "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore F1"}
SPEEDUP_NAMES = {"saved_layer_speedup": "saved-layer speed-up", "flops_speedup": "FLOPs speed-up",
                 "wallclock_speedup": "wall-clock speed-up"}


def display_task(name: str) -> str:
    return TASK_NAMES.get(name, name)


def display_backbone(name: str) -> str:
    return BACKBONE_NAMES.get(name, name)


def _plugin_names() -> list[str]:
    """Registered plugins, in the registry's order (reads entry points only: no plugin is imported)."""
    from eebench.methods.registry import BUILTIN_METHODS, method_entries

    return [name for name in method_entries() if name not in BUILTIN_METHODS]


def curve_style(curve: str, plugins: list[str] | None = None) -> CurveStyle:
    """The fixed style of ``curve`` ("pabee", "calm[oracle]", "myplugin", "myplugin[variant]").

    ``plugins``: the registry's plugin names in order (looked up when None). A variant of a plugin shares the
    plugin's colour; an unregistered name (records of a plugin not installed here) takes a spare slot after
    the plugins, by a stable hash of its name so it does not depend on what else is in the figure.
    """
    if curve in _BUILTIN_STYLES:
        colour, marker, label = _BUILTIN_STYLES[curve]
        return CurveStyle(colour, marker, label)
    base, variant = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", curve).groups()
    if base in _BUILTIN_STYLES:  # a built-in's variant without its own entry: the method's colour
        colour, marker, label = _BUILTIN_STYLES[base]
        return CurveStyle(colour, marker, f"{label} ({variant})")
    plugins = _plugin_names() if plugins is None else plugins
    slot = plugins.index(base) if base in plugins else len(plugins) + sum(map(ord, base))
    label = base if variant is None else f"{base} ({variant})"
    return CurveStyle(_SPARE_COLOURS[slot % len(_SPARE_COLOURS)], _SPARE_MARKERS[slot % len(_SPARE_MARKERS)], label)


def safe_name(name: str) -> str:
    """A file-name-safe version of a task or curve name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


# No creation dates and a fixed SVG id salt: the same records give byte-identical files, so regenerating a
# tracked figure shows no diff.
_NO_DATES = {"pdf": {"CreationDate": None, "ModDate": None}, "svg": {"Date": None}, "png": {}}


def figure_bytes(fig: matplotlib.figure.Figure, fmt: str, dpi: int = 200) -> bytes:
    """``fig`` rendered as ``fmt``, byte-identical for identical figures (no dates, fixed SVG ids)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fig.get_layout_engine() is not None:
        # Lay out once and freeze: constrained layout re-solves on each savefig from the previous solution, so
        # the bytes of an SVG would depend on which formats were saved before it.
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "eebench", "pdf.compression": 6}):
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_NO_DATES[fmt])
    return buffer.getvalue()


def save_figure(fig: matplotlib.figure.Figure, path: Path, fmt: str, dpi: int = 200) -> None:
    """Render ``fig`` as ``fmt`` in memory, then write it atomically (readers never see half a figure)."""
    atomic_write_bytes(Path(path), figure_bytes(fig, fmt, dpi))
