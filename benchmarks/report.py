"""A run's report: one Section per stage, written as JSON (raw numbers), Markdown (tables) and PNG (plots).

    report = Report(out_dir, settings={...}, machine=machine_info())
    section = report.section("model", "Model stage: torch eager vs onnxruntime")
    section.note("FLOPs counted analytically ...")
    section.table("encoder", ["engine", "batch", ...], rows)
    section.data["points"] = [...]          # raw numbers, JSON-serialisable
    section.figure(fig)                     # a matplotlib Figure (see plots.py)
    paths = report.write()                  # bench-<stage>-<date>.{json,md,png}

Each section is written to its own files, so stages added later (end-to-end over gRPC,
peers) only add a module under `benchmarks/stages/` that fills its Section.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3f}" if a >= 0.01 else f"{v:.2g}"
    return "–" if v is None else str(v)


def fmt_spread(point: dict, key: str, scale: float = 1.0) -> str:
    """'1.23 [1.20–1.31]': a point's median with its repeats' [min, max]."""
    lo, hi = point.get(f"{key}_spread", [point[key], point[key]])
    return f"{_cell(point[key] * scale)} [{_cell(lo * scale)}–{_cell(hi * scale)}]"


@dataclass
class Section:
    name: str  # file-name part: bench-<name>-<date>.*
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    figures: list[Any] = field(default_factory=list)
    wall_s: float = 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> Table:
        t = Table(title, columns, rows)
        self.tables.append(t)
        return t

    def figure(self, fig) -> None:
        self.figures.append(fig)


class Report:
    def __init__(self, out_dir: Path | str, *, settings: dict, machine: dict, date: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.machine = machine
        self.date = date or _dt.date.today().isoformat()
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.sections: list[Section] = []

    def section(self, name: str, title: str) -> Section:
        s = Section(name, title)
        self.sections.append(s)
        return s

    def stem(self, section: Section) -> str:
        return f"bench-{section.name}-{self.date}"

    def to_dict(self, section: Section) -> dict:
        return {
            "stage": section.name,
            "title": section.title,
            "date": self.date,
            "started": self.started,
            "wall_s": section.wall_s,
            "machine": self.machine,
            "settings": self.settings,
            "notes": section.notes,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows} for t in section.tables],
            "data": section.data,
        }

    def markdown(self, section: Section, pngs: list[str]) -> str:
        m = self.machine
        libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
        out = [
            f"# {section.title}",
            "",
            f"{self.date}; machine: {m.get('cpu')}, {m.get('cores_usable')} usable cores"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "")
            + f"; onnxruntime providers {m.get('onnxruntime_providers')}; {libs}."
            + (f" **{m['note']}**." if m.get("note") else ""),
            "",
            f"Settings: {json.dumps(self.settings)}; stage wall time {section.wall_s:.0f} s.",
            "",
        ]
        out += [f"- {n}" for n in section.notes]
        for t in section.tables:
            out += ["", t.markdown()]
        for p in pngs:
            out += ["", f"![{section.name}]({p})"]
        return "\n".join(out) + "\n"

    def write(self) -> list[Path]:
        """Every section's .json, .md and .png files; returns their paths."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for s in self.sections:
            stem = self.stem(s)
            pngs = []
            for i, fig in enumerate(s.figures):
                png = self.out_dir / (f"{stem}.png" if i == 0 else f"{stem}-{i + 1}.png")
                fig.savefig(png, dpi=110, bbox_inches="tight")
                pngs.append(png.name)
                paths.append(png)
            js = self.out_dir / f"{stem}.json"
            js.write_text(json.dumps(self.to_dict(s), indent=1, default=_json_default) + "\n")
            md = self.out_dir / f"{stem}.md"
            md.write_text(self.markdown(s, pngs))
            paths += [js, md]
        return paths


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# The curve benchmarks (privacy_curve, rerank_curve, federated_curve) write one <name>-<label>-<date>
# triple of files each: the Markdown table, the raw JSON and one PNG. One writer for the three.


def load_line() -> str:
    """'2 cores, load average 1.23': the machine as the curve reports state it (call it when the run starts)."""
    return f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}"


def curve_command(module: str, argv: list[str]) -> str:
    """The command line that reproduces a curve run, as its report quotes it."""
    return f"python -m attnrec.benchmarks.{module} " + " ".join(argv)


def add_curve_args(p, *, label_help: str = "dataset label in titles and file names") -> None:
    """--label, --out and --date, the curve scripts' shared output flags."""
    p.add_argument("--label", default="", help=f"{label_help} (default: the data file's stem)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="report folder (default: %(default)s)")
    p.add_argument("--date", help="date in the file names (default: today)")


def run_curve(
    args,
    kind: str,
    module: str,
    argv: list[str],
    measure: Callable[[], dict],
    markdown: Callable[[dict, str, str, str, str], str],
    plot: Callable[[dict, str, Path], None],
) -> int:
    """A curve script's run after its flags are parsed (add_curve_args's --label/--out/--date, and --data):
    the machine's load at the start, `measure()`, then `<kind>-<label>-<date>` .md/.json/.png written
    with markdown(result, label, date, command, machine) and plot(result, label, path)."""
    label = args.label or args.data.stem
    date = args.date or _dt.date.today().isoformat()
    machine = load_line()
    result = measure()
    command = curve_command(module, argv)
    write_curve_report(
        args.out,
        f"{kind}-{label}-{date}",
        date=date,
        command=command,
        result=result,
        markdown=markdown(result, label, date, command, machine),
        plot=lambda path: plot(result, label, path),
    )
    return 0


def write_curve_report(
    out_dir: Path, stem_name: str, *, date: str, command: str, result: dict, markdown: str, plot: Callable[[Path], None]
) -> Path:
    """out_dir/stem_name.md (markdown), .json ({date, command, **result}) and .png (plot(path)); returns the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    stem.with_suffix(".md").write_text(markdown)
    payload = {"date": date, "command": command, **result}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=_json_default))
    plot(stem.with_suffix(".png"))
    print(f"wrote {stem}.md, .json and .png")
    return stem
