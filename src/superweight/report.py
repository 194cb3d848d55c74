"""Write a one-file HTML report of a model's super weights, figures and experiment results.

The report is self-contained: images are embedded as base64 PNG, styles are inline, and
it has no scripts and no links to other files or hosts, so it opens offline and can be
mailed as one file. Sections, each an element with a stable ``id``:

- ``header``: model, file hash, dtype, device, package versions, date;
- ``super-weights``: the detection table (every candidate with its evidence), and the
  per-layer maxima in a collapsible table;
- ``directory``: comparison with the directory of known super weights;
- ``figures``: the model figures of :mod:`superweight.figures` (``figure-<name>``);
- ``results``: one table per result folder of ``superweight reproduce`` passed in, with
  the sensitivity and weight-quantization figures where they apply;
- ``missing``: experiments without a result folder, folders that could not be read and
  configurations without a finished run, each with the command that produces it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from superweight import __version__
from superweight.coordinates import SuperWeight
from superweight.detect import DetectionConfig, DetectionReport
from superweight.figures import (
    EXPERIMENTS,
    MODEL_FIGURES,
    RESULT_FIGURES,
    FigureOptions,
    FigureResult,
    ResultFolder,
    ResultFolderError,
    check_output_dir,
    draw_model_figure,
    figure_spec,
    load_result_folder,
    model_label,
    reproduce_command,
    run_accuracy,
    run_perplexities,
)
from superweight.provenance import provenance, write_text_atomic

log = logging.getLogger(__name__)

REPORT_DPI = 110


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of :func:`build_report`."""

    figures: tuple[str, ...] = MODEL_FIGURES
    """Model figures to draw, in order; see :data:`superweight.figures.MODEL_FIGURES`."""
    options: FigureOptions = dataclasses.field(default_factory=FigureOptions)
    """Settings of the figures and of detection (prompt, causal test)."""
    dpi: int = REPORT_DPI
    """Resolution of the embedded PNG images."""

    def __post_init__(self) -> None:
        for name in self.figures:
            if figure_spec(name).experiment is not None:
                raise ValueError(
                    f"figure {name!r} reads a result folder; pass the folder with --results instead of naming the figure"
                )
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int) or not 30 <= self.dpi <= 600:
            raise ValueError(f"dpi={self.dpi!r} is invalid; use an integer between 30 and 600")


# -- HTML helpers ----------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
table.meta td, table.meta th { text-align: left; }
code { background: #f5f5f5; padding: 0 0.25em; border-radius: 3px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
.confirmed, .known { color: #b03a00; font-weight: 600; } .rejected { color: #777; }
.note { background: #fff8e5; border-left: 4px solid #e69f00; padding: 0.5em 0.8em; margin: 0.8em 0; }
.ok { color: #00734d; font-weight: 600; } .bad { color: #b03a00; font-weight: 600; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: Sequence[int] = (0,),
           css_class: str | None = None) -> str:
    """Return an HTML table; cells must already be escaped."""
    def cell(tag: str, index: int, content: str) -> str:
        cls = ' class="text"' if index in text_columns else ""
        return f"<{tag}{cls}>{content}</{tag}>"

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


def _figure_html(result: FigureResult, dpi: int) -> str:
    encoded = base64.b64encode(result.to_bytes("png", dpi=dpi)).decode("ascii")
    return (
        f'<figure id="figure-{_e(result.name)}"><img alt="{_e(result.name)} figure" '
        f'src="data:image/png;base64,{encoded}"><figcaption>{_e(result.caption)}</figcaption></figure>'
    )


# -- sections --------------------------------------------------------------------------


def _header_section(loaded: Any, report: DetectionReport | None, info: dict[str, Any]) -> str:
    model = loaded.model
    rows = [
        ("model", loaded.spec),
        ("source", f"{loaded.source}" + (f" ({loaded.path})" if loaded.path else "")),
        ("file sha256", loaded.sha256 or "–"),
        ("architecture", f"{model.config.model_type}, {report.num_layers if report else '?'} decoder layers"),
        ("dtype, device", f"{str(loaded.dtype).removeprefix('torch.')}, {loaded.device}"),
        ("date (UTC)", info["date"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)),
        ("platform", f"{info['platform']}, {info['torch_threads']} torch threads"),
    ]
    table = _table(["", ""], [[_e(k), _e(v)] for k, v in rows], text_columns=(0, 1), css_class="meta")
    return (
        f'<header id="header"><h1>Super weights of {_e(loaded.spec)}</h1>'
        f"<p>Report written by superweight {_e(__version__)}.</p>{table}</header>"
    )


def _detection_section(report: DetectionReport) -> str:
    known = {SuperWeight(**d) for d in (report.directory or {}).get("known", [])}
    verified = report.config.verify
    headers = ["layer", "[row, col]", "module", "weight", "super activation", "input activation", "token",
               "pass", "persistence", "depth", "in directory"]
    if verified:
        headers += ["perplexity × alone", "perplexity × group", "status"]
    rows = []
    for c in report.candidates:
        sw = c.super_weight
        if report.directory is None:
            in_directory = "–"
        elif sw in known:
            in_directory = '<span class="known">yes</span>'
        else:
            in_directory = "no"
        row = [
            _e(sw.layer), _e(f"[{sw.row}, {sw.col}]"), f"<code>{_e(c.module)}</code>", _e(_number(c.value)),
            _e(_number(c.super_activation)), _e(_number(c.input_activation)), _e(f"{c.token} {c.token_text!r}"),
            _e(c.iteration), "–" if c.persistence is None else _e(f"{c.persistence:.0%}"), _e(f"{c.depth:.2f}"),
            in_directory,
        ]
        if verified:
            row += [_e(_number(c.perplexity_ratio)), _e(_number(c.group_perplexity_ratio)),
                    f'<span class="{_e(c.status)}">{_e(c.status)}</span>']
        rows.append(row)
    table = _table(headers, rows, text_columns=(1, 2, 6)) if rows else _note(
        "No layer's down-projection output spikes above the threshold, so there are no candidates. "
        "Lower <code>--spike-ratio</code> with <code>superweight detect</code> to see weaker spikes."
    )
    if verified:
        status = (f"Candidates were tested causally: perplexity on a built-in English text with the weight zeroed, "
                  f"relative to the original ({_number(report.base_perplexity)}); confirmed at ratio ≥ "
                  f"{report.config.confirm_ratio:g}.")
    else:
        status = ("Candidates are not tested causally, and not every spike is a super weight. Rerun with "
                  "<code>--verify</code> to zero each candidate and measure perplexity.")
    layer_rows = [
        [_e(s.layer), _e(_number(s.max_input)), _e(s.input_channel), _e(_number(s.max_output)), _e(s.output_channel),
         _e(s.spike_token)]
        for s in report.layers
    ]
    layer_table = _table(["layer", "max |input|", "input channel", "max |output|", "output channel", "token"],
                         layer_rows, text_columns=())
    return (
        '<section id="super-weights"><h2>Super weight candidates</h2>'
        f"<p>Detection on the prompt <code>{_e(report.config.prompt)}</code>, up to "
        f"{report.config.max_iterations} passes; a layer is a candidate when its max |down_proj output| is at "
        f"least {report.config.spike_ratio:g}× the median over layers and at least {report.config.min_spike:g}. "
        "Coordinates are [row, col] = [output channel, input channel] of the down-projection weight "
        f"(nn.Linear convention). {status}</p>{table}"
        f"<details><summary>Per-layer maxima of the first pass</summary>{layer_table}</details></section>"
    )


def _directory_section(report: DetectionReport | None, spec: str) -> str:
    if report is None:
        return ""
    d = report.directory
    if d is None:
        body = _note(f"{_e(spec)} is not in the directory of known super weights (ids match exactly, ignoring case); "
                     "run <code>superweight directory</code> for the list.")
    else:
        def listing(items: list[dict[str, int]]) -> str:
            return _e(", ".join(str(SuperWeight(**i)) for i in items) or "none")

        verdict = '<span class="ok">agrees</span>' if d["agrees"] else '<span class="bad">differs</span>'
        rows = [["known", listing(d["known"])], ["matched", listing(d["matched"])],
                ["missing from detection", listing(d["missing"])], ["found beyond the directory", listing(d["extra"])]]
        body = (f"<p>Directory entry {_e(d['model'])} (source: {_e(d['source'])}): detection {verdict}.</p>"
                + _table(["", "super weights"], rows, text_columns=(0, 1), css_class="meta"))
    return f'<section id="directory"><h2>Comparison with the directory</h2>{body}</section>'


def _result_table(folder: ResultFolder) -> str:
    tasks = sorted({t for run in folder.runs.values() for t in (run.get("tasks") or {})})
    sources = sorted({s for run in folder.runs.values() for s in run_perplexities(run)})
    headers = ["configuration", "settings", *[f"{t} acc %" for t in tasks], "average acc %",
               *[f"{s} perplexity" for s in sources]]
    rows = []
    for name, run in folder.runs.items():
        settings = run.get("settings") or {}
        # Unset options (None, False) and nested configs would only crowd the column.
        summary = ", ".join(f"{k}={v}" for k, v in settings.items()
                            if v is not None and v is not False and not isinstance(v, (dict, list)))
        accs = []
        for t in tasks:
            result = (run.get("tasks") or {}).get(t) or {}
            acc, stderr = result.get("acc"), result.get("acc_stderr")
            if acc is None:
                accs.append("–")
            elif stderr:
                accs.append(_e(f"{100 * acc:.2f} ± {100 * stderr:.2f}"))
            else:
                accs.append(_e(f"{100 * acc:.2f}"))
        average, average_stderr = run_accuracy(run)
        perplexities = run_perplexities(run)
        rows.append([
            _e(run.get("label") or name), _e(summary or "–"), *accs,
            "–" if average is None else _e(f"{average:.2f}" + (f" ± {average_stderr:.2f}" if average_stderr else "")),
            *[_e(_number(perplexities.get(s))) for s in sources],
        ])
    return _table(headers, rows, text_columns=(0, 1))


def _results_section(folders: list[ResultFolder], figures: dict[str, str]) -> str:
    if not folders:
        return ('<section id="results"><h2>Experiment results</h2>'
                + _note("No result folders were passed; add them with <code>--results DIR</code>.") + "</section>")
    parts = ['<section id="results"><h2>Experiment results</h2>']
    seen: dict[str, int] = {}
    for folder in folders:
        # Two folders of one experiment get distinct ids: results-table1, results-table1-2.
        seen[folder.experiment] = seen.get(folder.experiment, 0) + 1
        anchor = f"results-{folder.experiment}" + (f"-{seen[folder.experiment]}" if seen[folder.experiment] > 1 else "")
        parts.append(f'<h3 id="{_e(anchor)}">{_e(folder.experiment)}: {_e(EXPERIMENTS.get(folder.experiment, ""))}</h3>')
        parts.append(f"<p>Folder <code>{_e(folder.path)}</code>, model {_e(folder.model or '?')}; "
                     f"{len(folder.runs)} of {len(folder.configurations) or len(folder.runs)} configurations finished.</p>")
        if folder.settings:
            parts.append(f"<p>Settings: <code>{_e(', '.join(f'{k}={v}' for k, v in folder.settings.items()))}</code></p>")
        parts.append(_result_table(folder) if folder.runs else _note("No configuration has finished yet."))
        if str(folder.path) in figures:
            parts.append(figures[str(folder.path)])
    parts.append("</section>")
    return "".join(parts)


def _missing_section(folders: list[ResultFolder], problems: list[str], model: str) -> str:
    items = [f"<li>{p}</li>" for p in problems]
    present = {f.experiment for f in folders}
    for experiment, description in EXPERIMENTS.items():
        if experiment not in present:
            items.append(f"<li>No <b>{_e(experiment)}</b> results ({_e(description)}): run "
                         f"<code>{_e(reproduce_command(experiment, model))}</code> and pass the folder with "
                         "<code>--results DIR</code>.</li>")
    for folder in folders:
        if folder.missing:
            items.append(f"<li><b>{_e(folder.experiment)}</b> in <code>{_e(folder.path)}</code>: configurations "
                         f"without a finished run: {_e(', '.join(folder.missing))}. Finish them with "
                         f"<code>{_e(reproduce_command(folder.experiment, folder.model or model, str(folder.path)))}</code>.</li>")
    body = f"<ul>{''.join(items)}</ul>" if items else "<p>Nothing is missing.</p>"
    return f'<section id="missing"><h2>Missing results</h2>{body}</section>'


# -- the report ------------------------------------------------------------------------


def build_report(
    loaded: Any,
    *,
    results: Sequence[str | os.PathLike] = (),
    config: ReportConfig | None = None,
    super_weights: Sequence[SuperWeight] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> str:
    """Run detection, draw the figures, read the result folders and return the report as HTML.

    ``super_weights`` overrides where the figures take the super weights from (by
    default: confirmed candidates when ``config.options.verify``, else the directory
    entry, else detection with the causal test). ``on_step`` is called with a short
    description before each step, for progress display. A figure that cannot be drawn
    (for example, when no super weight is found) is replaced by a note saying why.
    """
    from superweight.api import detect_loaded, resolve_super_weights

    config = config or ReportConfig()
    options = config.options

    def step(message: str) -> None:
        # A caller that shows progress itself gets the message instead of the log line.
        if on_step is None:
            log.info("%s", message)
        else:
            on_step(message)

    info = provenance()
    step("detecting super weights")
    report = detect_loaded(loaded, DetectionConfig(prompt=options.prompt, verify=options.verify))

    notes: list[str] = []
    if super_weights:
        found = list(super_weights)
    elif options.verify:
        found = report.super_weights
    else:
        try:
            found, _ = resolve_super_weights(loaded, config=DetectionConfig(prompt=options.prompt, verify=True))
        except ValueError as error:
            found = []
            notes.append(str(error))

    figure_parts = []
    for name in config.figures:
        if name != "detection" and not found:
            figure_parts.append(_note(f"Figure <b>{_e(name)}</b> needs super weights, and none were found: "
                                      f"{_e('; '.join(notes) or 'detection confirmed none')}. Pass them with "
                                      "<code>--super-weight LAYER:ROW:COL</code>."))
            continue
        step(f"drawing figure {name}")
        try:
            result = draw_model_figure(name, loaded, options, report=report, super_weights=found)
        except ValueError as error:
            figure_parts.append(_note(f"Figure <b>{_e(name)}</b> could not be drawn: {_e(error)}"))
            continue
        figure_parts.append(_figure_html(result, config.dpi))

    folders: list[ResultFolder] = []
    problems: list[str] = []
    result_figures: dict[str, str] = {}
    for path in results:
        step(f"reading results {path}")
        try:
            folder = load_result_folder(path)
        except ResultFolderError as error:
            problems.append(_e(error))
            continue
        if folder.experiment not in EXPERIMENTS:
            problems.append(_e(f"{path} contains an unknown experiment {folder.experiment!r}; "
                               f"known experiments: {', '.join(EXPERIMENTS)}"))
            continue
        folders.append(folder)
        draw = RESULT_FIGURES.get(folder.experiment)
        if draw is not None and folder.runs:
            try:
                result_figures[str(folder.path)] = _figure_html(draw(folder), config.dpi)
            except ResultFolderError as error:
                problems.append(_e(error))

    found_text = ", ".join(str(sw) for sw in found) or "none"
    sections = [
        _header_section(loaded, report, info),
        _detection_section(report),
        _directory_section(report, loaded.spec),
        f'<section id="figures"><h2>Figures</h2><p>Super weights used by the figures: {_e(found_text)}.</p>'
        + "".join(figure_parts) + "</section>",
        _results_section(folders, result_figures),
        _missing_section(folders, problems, loaded.spec),
    ]
    title = f"Super weights of {loaded.spec}"
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="generator" content="superweight {_e(__version__)}"><style>{_CSS}</style></head>'
        f"<body>{''.join(sections)}<footer><p>Generated {_e(generated)} by superweight {_e(__version__)} "
        f"({_e(model_label(loaded))}).</p></footer></body></html>\n"
    )


def write_report(path: str | os.PathLike, text: str) -> Path:
    """Write the report atomically to ``path`` and return the path."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"report path {str(target)!r} is a folder; pass a file name such as report.html")
    check_output_dir(target.parent if str(target.parent) else ".")
    write_text_atomic(target, text)
    log.info("wrote %s (%.1f MB)", target, len(text.encode()) / 1e6)
    return target
