"""Results as text and pictures: fixed-width terminal tables, self-contained report folders
(``index.html`` and ``report.md`` with the same tables) and PNG plots (matplotlib's Agg
canvas; no display, no global backend switch)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NoBar:
    """A tqdm stand-in that draws nothing: the default progress display of the experiments,
    and the command line's when tqdm is not installed."""

    def __init__(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable or ())

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to draw."""

    set_postfix = close = update


def fmt(v: Any) -> str:
    """Table cell text, shared by the terminal tables and the report."""
    if isinstance(v, float):
        if v != v:
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return "-" if v is None else str(v)


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A compact fixed-width table for the terminal (first column left-aligned)."""
    body = [[fmt(r.get(c)) for c in columns] for r in [{c: c for c in columns}, *rows]]
    widths = [max(len(b[i]) for b in body) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                       enumerate(zip(b, widths, strict=True))) for b in body]  # fmt: skip
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


_CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{
text-align:left}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}
.note{color:#666}"""


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


@dataclass
class Report:
    """An ordered list of blocks (headings, paragraphs, tables, images) written twice."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
        self.blocks.append(("table", (list(rows), list(columns))))

    def image(self, filename: str, caption: str) -> None:
        self.blocks.append(("img", (filename, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":  # "|" inside a cell is escaped, or it would split the cell
                rows, cols = value
                out.append(_md_row(cols))
                out.append("|" + "|".join("---" for _ in cols) + "|")
                out += [_md_row([fmt(r.get(c)) for c in cols]) for r in rows] + [""]
            elif kind == "img":
                name, caption = value
                out += [f"![{caption}]({name})", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{e(value)}</h2>")
            elif kind == "p":
                out.append(f"<p>{e(value)}</p>")
            elif kind == "table":
                rows, cols = value
                out.append(
                    "<table><thead><tr>"
                    + "".join(f"<th>{e(c)}</th>" for c in cols)
                    + "</tr></thead><tbody>"
                )
                for r in rows:
                    out.append(
                        "<tr>" + "".join(f"<td>{e(fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                    )
                out.append("</tbody></table>")
            elif kind == "img":
                name, caption = value
                out.append(
                    f'<figure><img src="{e(name)}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def write(self, folder: Path) -> None:
        """Write index.html and report.md into ``folder`` (the PNGs are written by the plots)."""
        (folder / "index.html").write_text(self.html(), encoding="utf-8")
        (folder / "report.md").write_text(self.markdown(), encoding="utf-8")


# ----------------------------------------------------------------------------- plots
def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "drawing plots needs the package 'matplotlib': pip install 'torch-mfac[cli]' "
            "(or matplotlib)"
        ) from None

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def line_plot(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    percent_x: bool = False,
    markers: bool = False,
) -> Path:
    """One line per series (name -> (xs, ys)), saved as a PNG."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, label=name, linewidth=1.6)
    if logy:
        ax.set_yscale("log")
    if percent_x:
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{100 * v:.0f}%")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


def bar_plot(
    path: Path, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
    horizontal: bool = False, spread: Sequence[tuple[float, float]] | None = None,
) -> Path:  # fmt: skip
    """A bar chart (e.g. sparsity per layer), saved as a PNG; ``horizontal``: one labelled row
    per bar, the figure's height growing with their count (readable for hundreds of bars);
    ``spread``: a (low, high) whisker per bar."""
    n = len(values)
    if horizontal:
        longest = max((len(str(lab)) for lab in labels), default=4)
        fig = _figure(min(14.0, 4.5 + 0.07 * longest), min(120.0, max(3.0, 0.2 * n + 1.4)))
        ax = fig.add_subplot(1, 1, 1)
        err = None
        if spread is not None:
            err = [[v - lo for v, (lo, _) in zip(values, spread, strict=True)],
                   [hi - v for v, (_, hi) in zip(values, spread, strict=True)]]  # fmt: skip
        ax.barh(range(n), list(values), xerr=err, color="#4c72b0", ecolor="#333333", capsize=2)
        ax.set_yticks(range(n))
        ax.set_yticklabels(list(labels), fontsize="small")
        ax.invert_yaxis()  # first layer on top
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.set_xlabel(ylabel)
        ax.set_title(title, fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    else:
        fig = _figure(max(6.4, 0.35 * n + 2), 4.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(n), list(values), color="#4c72b0")
        ax.set_xticks(range(n))
        ax.set_xticklabels(list(labels), rotation=60, ha="right", fontsize="x-small")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path
