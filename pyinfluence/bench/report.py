"""The result of ``pyinfluence bench`` / :func:`~pyinfluence.bench.compare_solvers`: a
:class:`BenchReport` with a versioned JSON schema, a markdown report, a text table and an
accuracy-versus-time plot.

JSON schema ``"pyinfluence.bench/1"`` (``BenchReport.to_dict()``; ``null`` wherever a number is
unknown, undefined or not finite — the document never holds NaN or infinity)::

    {
      "schema": "pyinfluence.bench/1",
      "created": "2026-11-20T10:00:00+00:00",          # UTC, ISO 8601
      "machine": {"cpu": str, "cores": int, "usable_cores": int, "memory_gib": float,
                  "python": str, "numpy": str, "torch": str, "torch_threads": int,
                  "pyinfluence": str, "core_blas": str, "has_openmp": bool|null,
                  "core_threads": int, "thread_pools": [str] (with threadpoolctl),
                  "platform": str, "load_average": [float, float, float]},
      "settings": {"quick": bool, "repeats": int, "budget_s": float, ... , "wall_s": float},
      "tasks": [{"name": str, "kind": "linear"|"deep"|"user", "description": str,
                 "n_train": int, "m_test": int, "n_params": int, "l2": float, "damping": float,
                 "grad_norm": float, ...,
                 "reference": {"label": str, "kind": str, "time_s": float|null,
                               "max_residual": float|null, "error": str|null},
                 "loo": null | {"test_idx": [int], "train_idx": [[int]], "actual": [[float]],
                                "n_train": int, "method": str, "seconds": float}}],
      "rows": [{"task": str, "label": str, "path": "linear"|"torch", "family": str,
                "solver": str, "settings": {...}, "status": "ok"|"error"|"skipped",
                "error": str|null, "warnings": [str], "repeats": int,
                "time_s": float|null, "times_s": [float], "prepare_s": float|null,
                "solve_s": float|null, "peak_mem_mb": float|null,
                "mem_method": "vmhwm"|"tracemalloc"|null,
                "hvp_columns": int|null, "minibatch_hvp_columns": int|null, "flops": float|null,
                "iterations": int|null, "max_residual": float|null, "reference": bool,
                "pearson": float|null, "spearman": float|null, "top10_overlap": float|null,
                "top10_helpful": float|null, "top10_harmful": float|null,
                "max_rel_err": float|null, "loo_pearson": float|null, "pareto": bool}],
      "peers": [{"task": str, "library": str, "method": str, "settings": {...},
                 "status": "ok"|"error", "error": str|null, "time_s": float|null,
                 "peak_mem_mb": float|null, "pearson": ..., "spearman": ..., "top10_overlap": ...,
                 "top10_helpful": ..., "top10_harmful": ..., "max_rel_err": ...,
                 "loo_pearson": ..., "pyinfluence_time_at_accuracy_s": float|null,
                 "pyinfluence_setting_at_accuracy": str|null, "ratio_at_accuracy": float|null,
                 "pyinfluence_exact_time_s": float|null, "ratio_vs_exact": float|null,
                 "details": {...},                     # the peer's own account (PeerRun.details)
                 "pareto": bool}],
      "scaling": null | {...}                           # pyinfluence.bench.scaling's to_dict()
      "notes": [str]
    }

Row semantics are documented in :mod:`pyinfluence.bench.runner`; ratios are pyinfluence / peer
(< 1: pyinfluence faster): ``ratio_at_accuracy`` uses pyinfluence's fastest setting whose
Pearson against the reference is at least the peer's, ``ratio_vs_exact`` pyinfluence's fastest
exact path. The Pareto front (``pareto``) is computed per task over all successful points (our
settings and the peers') in (time, 1 − Pearson): a point is on it when no other point is both at
least as fast and at least as accurate, and strictly better in one.

matplotlib is used through its object API only (``matplotlib.figure.Figure``; no pyplot).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import platform
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import numpy as np

from pyinfluence._formatting import (
    format_correlation,
    format_seconds,
    format_value,
    markdown_table,
    text_table,
)
from pyinfluence._json import jsonable
from pyinfluence.bench._measure import cpu_model, usable_cores
from pyinfluence.bench.metrics import pareto_front

__all__ = ["SCHEMA", "BenchReport", "machine_info"]

SCHEMA = "pyinfluence.bench/1"
FILES = {
    "json": "bench.json",
    "markdown": "bench.md",
    "plot": "bench_accuracy_vs_time.png",
    "scaling_plot": "bench_scaling.png",
}
_ERR_FLOOR = 1e-16


def machine_info() -> dict[str, Any]:
    """The machine and software the benchmark ran on."""
    info: dict[str, Any] = {"cpu": cpu_model()}
    info["cores"] = os.cpu_count()
    info["usable_cores"] = usable_cores()
    try:
        with open("/proc/meminfo") as f:
            mt = re.search(r"MemTotal:\s+(\d+)", f.read())
        info["memory_gib"] = round(int(mt.group(1)) / 2**20, 1) if mt else None
    except OSError:
        info["memory_gib"] = None
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
    try:
        from pyinfluence import __version__, _core

        info["pyinfluence"] = str(__version__)
        info["core_blas"] = str(getattr(_core, "blas", "?"))
        info["has_openmp"] = getattr(_core, "has_openmp", None)
        from pyinfluence import get_num_threads

        info["core_threads"] = get_num_threads()
    except Exception:  # description only
        info.setdefault("pyinfluence", None)
    try:
        from threadpoolctl import threadpool_info

        info["thread_pools"] = [
            f"{p.get('internal_api')} {os.path.basename(str(p.get('filepath')))} "
            f"({p.get('num_threads')} threads)"
            for p in threadpool_info()
        ]
    except Exception:  # threadpoolctl is optional
        pass
    info["platform"] = platform.platform()
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return jsonable(info)


def _fmt_cost(row: dict[str, Any]) -> str:
    parts = []
    if row.get("hvp_columns"):
        parts.append(f"{row['hvp_columns']} HVP")
    if row.get("minibatch_hvp_columns"):
        parts.append(f"{row['minibatch_hvp_columns']} mb-HVP")
    if row.get("flops"):
        extra = " + H build" if row.get("family") == "exact" else ""
        parts.append(f"{row['flops'] / 1e9:.2g} GFLOP{extra}")
    return ", ".join(parts) or "–"


@dataclass
class BenchReport:
    """Benchmark results: ``rows`` (one per solver setting and task), ``tasks``, ``peers``,
    ``scaling``, ``machine``, ``settings``, ``notes``. See the module docstring for the schema.

    ``to_dict()`` / ``to_json()`` / ``save(dir)`` / ``to_markdown()`` / ``table()`` /
    ``plot(path)``; ``BenchReport.load(path)`` reads a saved bench.json back.
    """

    rows: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    peers: list[dict[str, Any]] = field(default_factory=list)
    scaling: Any = None
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    _references: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- access ---------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def rows_for(self, task: str) -> list[dict[str, Any]]:
        """The rows of one task, in benchmark order."""
        return [r for r in self.rows if r["task"] == task]

    def row(self, task: str, label: str) -> dict[str, Any]:
        """The row of ``task`` whose label is ``label`` (KeyError if none)."""
        for r in self.rows:
            if r["task"] == task and r["label"] == label:
                return r
        raise KeyError(f"no row {label!r} for task {task!r}")

    def reference_up_loss(self, task: str) -> Optional[np.ndarray]:
        """The reference up_loss matrix of ``task`` (kept in memory only, not in the JSON)."""
        return self._references.get(task)

    def pareto(self, task: str) -> list[dict[str, Any]]:
        """Rows (ours and peers') on the Pareto front of ``task``, fastest first."""
        pts = [r for r in self.rows_for(task) if r.get("pareto")]
        pts += [p for p in self.peers if p["task"] == task and p.get("pareto")]
        return sorted(pts, key=lambda r: r["time_s"])

    def mark_pareto(self) -> None:
        """Set ``pareto`` on every row and peer row (see the module docstring)."""
        for r in self.rows:
            r["pareto"] = False
        for p in self.peers:
            p["pareto"] = False
        for name in {r["task"] for r in self.rows} | {p["task"] for p in self.peers}:
            cand = [r for r in self.rows if r["task"] == name] + [p for p in self.peers if p["task"] == name]
            cand = [
                r
                for r in cand
                if r.get("status") == "ok" and r.get("time_s") is not None and r.get("pearson") is not None
            ]
            pts = [(r["time_s"], max(1.0 - r["pearson"], 0.0)) for r in cand]
            for i in pareto_front(pts):
                cand[i]["pareto"] = True

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``pyinfluence.bench/1``); only finite numbers or null."""
        scal = self.scaling
        if scal is not None and hasattr(scal, "to_dict"):
            scal = scal.to_dict()
        return jsonable(
            {
                "schema": SCHEMA,
                "created": self.created,
                "machine": self.machine,
                "settings": self.settings,
                "tasks": self.tasks,
                "rows": self.rows,
                "peers": self.peers,
                "scaling": scal,
                "notes": self.notes,
            }
        )

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BenchReport:
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"not a {SCHEMA} document (schema: {got!r})")
        return cls(
            rows=list(doc["rows"]),
            tasks=list(doc["tasks"]),
            peers=list(doc.get("peers") or []),
            scaling=doc.get("scaling"),
            machine=dict(doc.get("machine") or {}),
            settings=dict(doc.get("settings") or {}),
            notes=list(doc.get("notes") or []),
            created=doc.get("created", ""),
        )

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> BenchReport:
        """Read a bench.json written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, out_dir: Union[str, os.PathLike], plot: bool = True) -> dict[str, pathlib.Path]:
        """Write bench.json, bench.md and (with matplotlib) bench_accuracy_vs_time.png (and
        bench_scaling.png when a scaling sweep ran) into ``out_dir``; returns the paths."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, pathlib.Path] = {}
        p = out / FILES["json"]
        p.write_text(self.to_json() + "\n", encoding="utf-8")
        paths["json"] = p
        if plot:
            try:
                paths["plot"] = self.plot(out / FILES["plot"])
            except ImportError as exc:
                self.notes.append(f"no plot: {exc}")
            if self.scaling is not None and hasattr(self.scaling, "plot"):
                try:
                    sp = out / FILES["scaling_plot"]
                    self.scaling.plot(sp)
                    paths["scaling_plot"] = sp
                except Exception as exc:
                    self.notes.append(f"scaling plot failed: {type(exc).__name__}: {exc}")
        p = out / FILES["markdown"]
        p.write_text(
            self.to_markdown(
                figure=FILES["plot"] if "plot" in paths else None,
                scaling_figure=FILES["scaling_plot"] if "scaling_plot" in paths else None,
            ),
            encoding="utf-8",
        )
        paths["markdown"] = p
        return paths

    # -- text ------------------------------------------------------------------------------------
    _COLS: ClassVar[list[str]] = [
        "setting",
        "time",
        "prepare",
        "solve",
        "peak MB",
        "cost",
        "Pearson",
        "Spearman",
        "top-10",
        "LOO r",
        "residual",
    ]

    def _cells(self, r: dict[str, Any], reason: bool = True) -> list[str]:
        if r["status"] != "ok":
            note = "skipped" if r["status"] == "skipped" else "ERROR"
            return [
                r["label"],
                note,
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                (r.get("error") or "")[:300] if reason else "",
            ]
        lab = r["label"] + (" (ref)" if r.get("reference") else "") + (" *" if r.get("pareto") else "")
        return [
            lab,
            format_seconds(r["time_s"]),
            format_seconds(r["prepare_s"]),
            format_seconds(r["solve_s"]),
            format_value(None if r["peak_mem_mb"] is None else round(r["peak_mem_mb"], 1), 3),
            _fmt_cost(r),
            format_correlation(r["pearson"]),
            format_correlation(r["spearman"]),
            "–" if r["top10_overlap"] is None else f"{r['top10_overlap']:.2f}",
            format_correlation(r["loo_pearson"]),
            "–" if r["max_residual"] is None else f"{r['max_residual']:.1e}",
        ]

    def _peer_cells(self, p: dict[str, Any], reason: bool = True) -> list[str]:
        if p["status"] != "ok":
            return [
                f"{p['library']} {p['method']}",
                format_seconds(p.get("time_s")),
                "ERROR",
                "",
                "",
                "",
                "",
                (p.get("error") or "")[:300] if reason else "",
            ]
        return [
            f"{p['library']} {p['method']}" + (" *" if p.get("pareto") else ""),
            format_seconds(p["time_s"]),
            format_correlation(p["pearson"]),
            format_correlation(p["spearman"]),
            "–" if p["top10_overlap"] is None else f"{p['top10_overlap']:.2f}",
            format_correlation(p["loo_pearson"]),
            "–"
            if p["ratio_at_accuracy"] is None
            else f"{p['ratio_at_accuracy']:.3g} ({p['pyinfluence_setting_at_accuracy']})",
            "–" if p["ratio_vs_exact"] is None else f"{p['ratio_vs_exact']:.3g}",
        ]

    @staticmethod
    def _md_cells(r: dict[str, Any], cells: list[str]) -> list[str]:
        """Markdown cells: the Pareto front in bold instead of the screen's ``*``."""
        cells[0] = cells[0].replace(" *", "")
        if r.get("pareto"):
            cells[0] = f"**{cells[0]}**"
        return cells

    _PEER_COLS: ClassVar[list[str]] = [
        "library / method",
        "time",
        "Pearson",
        "Spearman",
        "top-10",
        "LOO r",
        "pyinfluence/peer time at ≥ accuracy",
        "pyinfluence exact / peer",
    ]

    def _task_header(self, t: dict[str, Any]) -> str:
        if "error" in t and "kind" not in t:
            return f"{t['name']}: FAILED: {t['error']}"
        ref = t.get("reference") or {}
        s = (
            f"{t['name']} ({t.get('kind')}): n = {t.get('n_train')}, p = {t.get('n_params')}, "
            f"m = {t.get('m_test')}"
        )
        if t.get("l2") is not None:
            s += f", l2 = {t['l2']:g}, damping = {t.get('damping', 0):g}"
        s += f"; reference: {ref.get('label', '?')}"
        if ref.get("error"):
            s += f" (FAILED: {ref['error']})"
        return s

    def table(self) -> str:
        """The results as a plain-text table for the screen (``*`` = on the Pareto front)."""
        lines = []
        for t in self.tasks:
            lines.append(self._task_header(t))
            trows = self.rows_for(t["name"])
            if trows:
                lines.append(
                    text_table(self._COLS, [self._cells(r, False) for r in trows], align="lr", rule=True)
                )
                for r in trows:
                    if r["status"] != "ok" and r.get("error"):
                        lines.append(f"    {r['label']}: {r['status']}: {r['error'][:240]}")
            peers = [p for p in self.peers if p["task"] == t["name"]]
            if peers:
                lines.append("  other libraries:")
                lines.append(
                    text_table(
                        self._PEER_COLS, [self._peer_cells(p, False) for p in peers], align="lr", rule=True
                    )
                )
                for p in peers:
                    if p["status"] != "ok" and p.get("error"):
                        lines.append(f"    {p['library']} {p['method']}: {p['error'][:240]}")
            lines.append("")
        if self.rows or self.peers:
            lines.append(
                "(ref) = the task's ground truth; * = on the Pareto front of time against "
                "1 − Pearson; cost: HVP = full-training-set Hessian-vector products "
                "(columns), mb-HVP = minibatch ones, GFLOP for exact paths"
            )
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self, figure: Optional[str] = None, scaling_figure: Optional[str] = None) -> str:
        """A markdown report: per task its set-up, reference and table; peers; scaling; machine."""
        L = ["# pyinfluence bench", ""]
        st = self.settings
        L.append(
            f"Created {self.created}; schema `{SCHEMA}`. "
            + ("Quick mode. " if st.get("quick") else "")
            + (f"Wall time {st['wall_s']:.0f} s. " if st.get("wall_s") else "")
            + f"Repeats per setting: {st.get('repeats', '?')} (median reported)."
        )
        L.append("")
        L.append(
            "Time = a fresh influence object + the solver's preparation + `up_loss` for all "
            "m test points (median over repeats); prepare = construction + `prepare()`, "
            "solve = the `up_loss` call. Peak memory = rise of the resident high-water mark "
            "during the first repeat. Cost = full-training-set HVP columns / minibatch HVP "
            "columns counted at the Hessian operator, or flops for exact paths. Accuracy "
            "against the task's reference: Pearson and Spearman over the whole "
            "(n_train × m) up_loss matrix, top-10 = mean overlap of the 10 most helpful and "
            "10 most harmful training points per test point, LOO r = Pearson of −up_loss/n "
            "against actual leave-one-out retraining. **Bold** = on the Pareto front of "
            "time against 1 − Pearson."
        )
        L.append("")
        if figure:
            L += [f"![accuracy versus time]({figure})", ""]
        for t in self.tasks:
            L.append(f"## {t['name']}")
            L.append("")
            if "error" in t and "kind" not in t:
                L += [f"Task failed: {t['error']}", ""]
                continue
            desc = str(t.get("description", ""))
            L.append(
                f"{desc[:1].upper() + desc[1:]}. n = {t.get('n_train')}, "
                f"p = {t.get('n_params')}, m = {t.get('m_test')} test points"
                + (
                    f", l2 = {t['l2']:g}, damping = {t.get('damping', 0):g}"
                    if t.get("l2") is not None
                    else ""
                )
                + (f"; ‖∇R(θ̂)‖ = {t['grad_norm']:.1e}" if t.get("grad_norm") is not None else "")
                + (f"; trained by {t['trainer']}" if t.get("trainer") else "")
                + "."
            )
            if t.get("data"):
                L.append(f"Data: {t['data']}.")
            ref = t.get("reference") or {}
            L.append(
                f"Reference (ground truth): **{ref.get('label', '?')}**"
                + (f" ({format_seconds(ref.get('time_s'))})" if ref.get("time_s") else "")
                + (f", FAILED: {ref['error']}" if ref.get("error") else "")
                + "."
            )
            loo = t.get("loo")
            if loo:
                n_pairs = sum(len(x) for x in loo["train_idx"])
                L.append(
                    f"Leave-one-out check: {n_pairs} (training point, test point) pairs — test "
                    f"points {loo['test_idx']}, for each the training points with the "
                    f"largest |reference up_loss|; actual change by {loo['method']}."
                )
            elif ref.get("loo_error"):
                L.append(f"Leave-one-out check failed: {ref['loo_error']}")
            L.append("")
            L.append(
                markdown_table(
                    self._COLS,
                    [self._md_cells(r, self._cells(r)) for r in self.rows_for(t["name"])],
                    align="lr",
                )
            )
            L.append("")
            warn = [(r["label"], w) for r in self.rows_for(t["name"]) for w in r.get("warnings", [])]
            if warn:
                L.append("Warnings:")
                L += [f"- {lab}: {w}" for lab, w in warn]
                L.append("")
            peers = [p for p in self.peers if p["task"] == t["name"]]
            if peers:
                L.append(
                    "Other libraries on the same model, weights and conventions "
                    "(normalised to pyinfluence's up_loss):"
                )
                L.append("")
                L.append(
                    markdown_table(
                        self._PEER_COLS, [self._md_cells(p, self._peer_cells(p)) for p in peers], align="lr"
                    )
                )
                L.append("")
        if self.scaling is not None:
            L += ["## Scaling of the exact linear path", ""]
            if scaling_figure:
                L += [f"![scaling]({scaling_figure})", ""]
            if hasattr(self.scaling, "to_markdown"):
                L += [self.scaling.to_markdown(), ""]
            else:
                L += ["```json", json.dumps(jsonable(self.scaling), indent=1)[:4000], "```", ""]
        if self.notes:
            L += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        L += ["## Machine", ""]
        for k, v in self.machine.items():
            L.append(f"- {k}: {v}")
        return "\n".join(L).rstrip() + "\n"

    # -- figure ----------------------------------------------------------------------------------
    def plot(self, path: Union[str, os.PathLike, None] = None, figure: Any = None):
        """Accuracy (1 − Pearson against the reference, log axis) against time (log axis), one
        panel per task, one point per setting (peers as crosses), the Pareto front as a step line
        with circled points. Saves a PNG to ``path`` (returns the path) or draws into ``figure``
        / a new Figure (returned)."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import NullFormatter
        except ImportError:
            raise ImportError(
                "plotting needs matplotlib: pip install matplotlib (or 'pyinfluence[bench]')"
            ) from None
        names = [
            t["name"]
            for t in self.tasks
            if any(r["status"] == "ok" and r["pearson"] is not None for r in self.rows_for(t["name"]))
        ]
        k = max(1, len(names))
        ncol = min(3, k)
        nrow = math.ceil(k / ncol)
        fig = figure if figure is not None else Figure(figsize=(5.6 * ncol, 4.4 * nrow), layout="constrained")
        axes = fig.subplots(nrow, ncol, squeeze=False)
        colors = {"linear-exact": "black", "exact": "tab:purple", "cg": "tab:blue", "lissa": "tab:orange"}
        for idx, ax in enumerate(axes.flat):
            if idx >= len(names):
                ax.set_axis_off()
                continue
            name = names[idx]
            pts = []
            for r in self.rows_for(name):
                if r["status"] != "ok" or r["pearson"] is None or r["time_s"] is None:
                    continue
                e = max(1.0 - r["pearson"], _ERR_FLOOR)
                pts.append((r["time_s"], e, bool(r.get("pareto"))))
                ax.scatter(r["time_s"], e, color=colors.get(r["family"], "tab:gray"), s=36, zorder=3)
                short = r["label"].replace("depth=", "d=").replace("repeats=", "r=").replace("batch=", "b=")
                ax.annotate(
                    short + (" (ref)" if r.get("reference") else ""),
                    (r["time_s"], e),
                    fontsize=6.5,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
            for p in self.peers:
                if p["task"] != name or p["status"] != "ok" or p["pearson"] is None or not p.get("time_s"):
                    continue
                e = max(1.0 - p["pearson"], _ERR_FLOOR)
                pts.append((p["time_s"], e, bool(p.get("pareto"))))
                ax.scatter(p["time_s"], e, marker="x", color="tab:red", s=48, zorder=3)
                ax.annotate(
                    f"{p['library']} {p['method']}",
                    (p["time_s"], e),
                    fontsize=6.5,
                    xytext=(4, -8),
                    textcoords="offset points",
                    color="tab:red",
                )
            front = sorted([(t, e) for t, e, on in pts if on])
            if front:
                fx, fy = [t for t, _ in front], [e for _, e in front]
                ax.step(fx, fy, where="post", color="tab:green", lw=1.4, zorder=2)
                ax.scatter(
                    fx,
                    fy,
                    facecolors="none",
                    edgecolors="tab:green",
                    s=130,
                    zorder=4,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.margins(x=0.35, y=0.12)
            ax.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges: no crowded labels
            t = next(t for t in self.tasks if t["name"] == name)
            ref = (t.get("reference") or {}).get("label", "?")
            ax.set_title(
                f"{name} (n={t.get('n_train')}, p={t.get('n_params')}, m={t.get('m_test')})", fontsize=9
            )
            ax.set_xlabel("time for the full up_loss matrix [s]")
            ax.set_ylabel(f"1 − Pearson vs {ref}")
            ax.grid(True, which="both", alpha=0.25)
        fig.suptitle(
            "accuracy against time, one point per setting — black: C++ exact linear, "
            "purple: torch Exact, blue: CG, orange: LiSSA, grey: other solvers, red ×: "
            "other libraries; green: Pareto front (1 − r floored at 1e-16)",
            fontsize=8,
        )
        if path is None:
            return fig
        fig.savefig(path, dpi=110)
        return pathlib.Path(path)
