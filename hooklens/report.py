"""`report.html`: one offline page per `hooklens` run with its summary table and every figure, each as the PNG the
run wrote and, when plotly is installed (`pip install hooklens[plot]`), as an interactive plotly figure.

plotly.js is embedded once in the page (no CDN), and the PNGs are embedded as data URIs, so the page opens
offline and still works when copied away from the run's directory. Without plotly the page holds the PNGs and the
table, and says how to get the interactive figures.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from hooklens import interactive
from hooklens.utils import get_act_name

REPORT_NAME = "report.html"


@dataclass
class ReportFigure:
    """One figure of the page: its heading, the PNG file of the run it shows (a name inside the run's directory)
    and/or the interactive figure, and a sentence saying what it shows."""

    title: str
    png: Optional[str] = None
    plotly: Any = None
    caption: str = ""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
table.summary { border-collapse: collapse; margin: 8px 0 24px; }
table.summary td { border-bottom: 1px solid #ddd; padding: 4px 14px 4px 0; vertical-align: top; }
table.summary td:first-child { font-weight: 600; white-space: nowrap; }
section.figure { margin: 28px 0; border-top: 1px solid #ccc; padding-top: 8px; }
section.figure img { max-width: 100%; display: block; margin-top: 8px; }
p.caption { color: #555; margin: 4px 0 8px; }
p.note { background: #fff4d6; padding: 8px 12px; }
"""


def write_report(out: Path, title: str, rows: Sequence[tuple], figures: Sequence[ReportFigure],
                 note: str = "") -> Path:
    """Write `out/report.html`: `title`, the summary `rows` ((name, value) pairs, as the command prints them), an
    optional `note`, then every figure (PNGs read from `out`). Returns the page's path."""
    out = Path(out)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style>"]
    if any(figure.plotly is not None for figure in figures):
        from plotly.offline import get_plotlyjs

        # plotly.js once, inline: every figure below uses it, and the page needs no network
        parts.append(f"<script type=\"text/javascript\">{get_plotlyjs()}</script>")
    parts.append(f"</head><body>\n<h1>{html.escape(title)}</h1>")
    if note:
        parts.append(f"<p class=\"note\">{html.escape(note)}</p>")
    parts.append(_table(rows))
    for number, figure in enumerate(figures):
        parts.append(_section(out, figure, number))
    parts.append("</body></html>\n")
    path = out / REPORT_NAME
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _table(rows: Sequence[tuple]) -> str:
    cells = "".join(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(value))}</td></tr>\n"
                    for key, value in rows)
    return f"<table class=\"summary\">\n{cells}</table>"


def _section(out: Path, figure: ReportFigure, number: int) -> str:
    """A figure's heading, caption, interactive figure and embedded PNG (a link to the file under it)."""
    parts = [f"<section class=\"figure\" id=\"figure-{number}\"><h2>{html.escape(figure.title)}</h2>"]
    if figure.caption:
        parts.append(f"<p class=\"caption\">{html.escape(figure.caption)}</p>")
    if figure.plotly is not None:
        parts.append(figure.plotly.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{number}",
                                           config={"responsive": True}))
    if figure.png is not None:
        encoded = base64.b64encode((out / figure.png).read_bytes()).decode("ascii")
        name = html.escape(figure.png)
        parts.append(f"<img class=\"png\" alt=\"{name}\" src=\"data:image/png;base64,{encoded}\">"
                     f"<p class=\"caption\">PNG: <a href=\"{name}\">{name}</a></p>")
    parts.append("</section>")
    return "\n".join(parts)


def _no_plotly_note() -> str:
    return ("Static figures only: the interactive ones (hover values, a head selector) need plotly, an optional "
            f"dependency. Install it with `{interactive.INSTALL_HINT}` and run the command again.")


def token_labels(model, tokens: Tensor) -> List[str]:
    """String tokens of a prompt `[pos]` (token ids when the model has no tokenizer)."""
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens]
    return list(model.to_str_tokens(tokens))


def induction_report(out: Path, model, tokens: Tensor, summary: Dict[str, Any], rows: Sequence[tuple]) -> Path:
    """The page of `hooklens induction`: the run's figures, and the attention patterns of the top induction and
    previous-token heads' layers (every head, via the selector) on the first prompt of `tokens` [batch, pos]."""
    pngs = [("Loss by position", "loss_by_position.png", "Next-token loss (nats) at each position of the repeated "
             "random tokens, batch mean: high on the first half, low on the second once induction heads copy."),
            ("Induction scores", "induction_scores.png", "Mean attention from each second-half token to the token "
             "after its first occurrence."),
            ("Previous-token scores", "prev_token_scores.png", "Mean attention of each token to the one before."),
            ("Attention pattern of the top induction head", "top_induction_head_pattern.png",
             "Destination (rows) by source (columns); the off-diagonal stripe is induction."),
            ("MLP patching (the seeds' experiment)", "mlp_patching.png", "Loss change of the second half when one "
             "layer's MLP output at a repeated token is replaced by its output at the token's first occurrence."),
            ("OV circuit copying scores", "ov_copying_scores.png", "Positive eigenvalue share of W_E W_OV W_U: "
             "heads that copy their source token's identity.")]
    figures = [ReportFigure(title, png, None, caption) for title, png, caption in pngs]
    if not interactive.available():
        return write_report(out, "hooklens induction", rows, figures, note=_no_plotly_note())
    labels = token_labels(model, tokens[0])
    figures[0].plotly = interactive.line(torch.tensor(summary["loss_by_position"]), "Loss by position",
                                         labels[1:], "predicted position", "loss (nats)")
    figures[1].plotly = interactive.head_scores(torch.tensor(summary["induction_scores"]), "Induction scores",
                                                "induction score")
    figures[2].plotly = interactive.head_scores(torch.tensor(summary["prev_token_scores"]),
                                                "Previous-token scores", "previous-token score")
    ind_pattern, prev_pattern = _top_head_patterns(model, tokens[:1], summary, labels)
    figures[3].plotly = ind_pattern
    figures.insert(4, ReportFigure("Attention pattern of the top previous-token head", None, prev_pattern,
                                   "Every head of the layer via the selector; the top previous-token head first."))
    if summary["mlp_patching_loss_change"] is not None:
        positions = summary["mlp_patching_positions"]
        figures[5].plotly = interactive.patching(torch.tensor(summary["mlp_patching_loss_change"]),
                                                 [labels[p] for p in positions], "MLP patching: loss change",
                                                 "repeated token", metric_name="loss change (nats)")
    figures[6].plotly = interactive.patching(torch.tensor(summary["ov_copying_scores"]),
                                             [f"H{h}" for h in range(model.cfg.n_heads)],
                                             "OV circuit copying scores", "head", metric_name="copying score")
    return write_report(out, "hooklens induction", rows, figures)


def _top_head_patterns(model, prompt: Tensor, summary: Dict[str, Any], labels: List[str]):
    """Interactive attention patterns of the layers of the top induction and previous-token heads (`prompt`
    [1, pos]), each opening on its top head."""
    (ind_layer, ind_head), (prev_layer, prev_head) = summary["top_induction_head"], summary["top_prev_token_head"]
    names = {get_act_name("pattern", ind_layer), get_act_name("pattern", prev_layer)}
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt, names_filter=lambda name: name in names)
    return (interactive.attention_patterns(cache["pattern", ind_layer][0], labels, ind_layer, ind_head,
                                           "Top induction head's layer"),
            interactive.attention_patterns(cache["pattern", prev_layer][0], labels, prev_layer, prev_head,
                                           "Top previous-token head's layer"))


def patch_report(out: Path, model, corrupted: Tensor, summary: Dict[str, Any], rows: Sequence[tuple]) -> Path:
    """The page of `hooklens patch`: residual-stream and head-output patching (`corrupted` [1, pos])."""
    figures = [ReportFigure("Residual stream patching", "resid_pre_patching.png", None,
                            "Normalized logit difference (0 = corrupted, 1 = clean) after patching the clean "
                            "residual stream into the corrupted run at one layer and position."),
               ReportFigure("Head output patching", "head_out_patching.png", None,
                            "The same metric after patching one head's output at every position.")]
    if not interactive.available():
        return write_report(out, "hooklens patch", rows, figures, note=_no_plotly_note())
    labels = token_labels(model, corrupted[0])
    figures[0].plotly = interactive.patching(torch.tensor(summary["resid_pre_patching"]), labels,
                                             "Residual stream patching", "position",
                                             metric_name="normalized logit diff")
    figures[1].plotly = interactive.patching(torch.tensor(summary["head_out_patching"]),
                                             [f"H{h}" for h in range(model.cfg.n_heads)], "Head output patching",
                                             "head", metric_name="normalized logit diff")
    return write_report(out, "hooklens patch", rows, figures)


def circuit_report(out: Path, summary: Dict[str, Any], rows: Sequence[tuple]) -> Path:
    """The page of `hooklens circuit`: the faithfulness curves and the drawn top circuit."""
    figures = [ReportFigure("Faithfulness", "faithfulness.png", None, "MIB's faithfulness f of the circuits of the "
                            "top k edges (1 = the full model, 0 = the empty circuit); CPR is the area under the "
                            "signed ranking's curve, CMD the area under |1 - f| of the |score| ranking's."),
               ReportFigure("Top circuit", "circuit.png", None, "The top edges by |score| after pruning.")]
    if not interactive.available():
        return write_report(out, "hooklens circuit", rows, figures, note=_no_plotly_note())
    curves = {name: (summary["faithfulness"][key]["ks"], summary["faithfulness"][key]["faithfulness"])
              for name, key in (("signed ranking", "signed"), ("|score| ranking", "absolute"))}
    figures[0].plotly = interactive.curves(curves, "Faithfulness", "fraction of edges in the circuit (k)",
                                           "faithfulness f", log_x=summary["faithfulness"]["signed"]["log_scale"])
    return write_report(out, "hooklens circuit", rows, figures)
