"""The static site: an index of latents, a page per latent, a dictionary-wide page.

Self-contained on purpose: every page carries its own CSS (and the index its small script), charts
are inline SVG, and nothing is fetched (no CDN, no fonts, no data files), so the folder opens
from disk in any browser with no server and no network, and can be copied or zipped as it is.
Pages are written from the records of report.py; the index keeps the numbers it sorts on in
`data-*` attributes and the words it searches in `data-text`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saetrain.atomic import atomic_write_bytes

INDEX = "index.html"
DICTIONARY_PAGE = "dictionary.html"
LATENTS_DIR = "latents"

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222;max-width:70em}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}
a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}
th{cursor:pointer;user-select:none;background:#f4f4f4}td.n,th.n{text-align:right}
.ctx{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;margin:2px 0;padding:2px 4px;
border-left:3px solid #eee}.ctx.rep{opacity:.5}
.ctx span{border-radius:2px}.ctx .m{outline:1.5px solid #c0392b}
.stats span{margin-right:1.6em}.logits td{font-family:ui-monospace,monospace}
.pos{color:#1a7f37}.neg{color:#c0392b}.muted{color:#777}
input{font-size:14px;padding:3px 6px;width:22em}
.row{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}
td.tok{max-width:16em;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;
font-family:ui-monospace,monospace}
""" + "".join(f".a{b}{{background:rgba(232,131,58,{b / 10:.1f})}}" for b in range(1, 11))

INDEX_JS = """
const body=document.querySelector('#latents tbody');
const rows=[...body.rows];
let key=null,desc=true;
document.querySelectorAll('#latents th[data-key]').forEach(th=>th.onclick=()=>{
  const k=th.dataset.key;desc=(key===k)?!desc:true;key=k;
  rows.sort((a,b)=>{const x=+a.dataset[k],y=+b.dataset[k];return desc?y-x:x-y});
  rows.forEach(r=>body.appendChild(r));
});
document.getElementById('q').oninput=e=>{
  const q=e.target.value.toLowerCase();let shown=0;
  rows.forEach(r=>{const ok=!q||r.dataset.text.includes(q);r.hidden=!ok;shown+=ok});
  document.getElementById('shown').textContent=shown;
};
"""


def _page(title: str, body: str, script: str = "") -> bytes:
    script = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}{script}</body></html>"
    ).encode()


def _shown(token: str) -> str:
    """A token as text in a context line: newlines and tabs made visible."""
    return html.escape(token.replace("\n", "↵\n").replace("\t", "→"))


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def bars_svg(counts: Sequence[float], lo: str, hi: str, width: int = 420, height: int = 90,
             marker: float | None = None) -> str:  # fmt: skip
    """A bar chart (inline SVG) with its x-axis ends labelled; `marker`: a red line at that
    fraction of the width."""
    top = max(max(counts, default=0), 1)
    w = width / max(len(counts), 1)
    parts = [f'<svg width="{width}" height="{height + 16}" role="img">']
    for i, c in enumerate(counts):
        h = height * c / top
        if c:
            parts.append(
                f'<rect x="{i * w:.1f}" y="{height - h:.1f}" width="{max(w - 1, 1):.1f}" '
                f'height="{h:.1f}" fill="#e8833a"><title>{c:g}</title></rect>'
            )
    if marker is not None:
        x = width * marker
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#c0392b" '
                     'stroke-dasharray="3 2"/>')  # fmt: skip
    parts.append(f'<text x="0" y="{height + 13}" font-size="11">{html.escape(lo)}</text>')
    parts.append(f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">'
                 f"{html.escape(hi)}</text></svg>")  # fmt: skip
    return "".join(parts)


def context_html(example: dict[str, Any], act_max: float) -> str:
    """One example: its tokens, those where the latent is active shaded by its activation
    (ten steps of act / act_max, classes a1..a10; the value on hover), the example's own token
    outlined (class m). Silent tokens are bare text, which keeps a page small."""
    spans = []
    pairs = zip(example["tokens"], example["tokens_acts_list"], strict=True)
    for i, (tok, act) in enumerate(pairs):
        classes = []
        if act > 0 and act_max > 0:
            classes.append(f"a{min(max(math.ceil(10 * act / act_max), 1), 10)}")
        if i == example["train_token_ind"]:
            classes.append("m")
        if classes:
            cls = " ".join(classes)
            spans.append(f'<span class="{cls}" title="{act:.3g}">{_shown(tok)}</span>')
        else:
            spans.append(_shown(tok))
    rep = " rep" if example["is_repeated_datapoint"] else ""
    return f'<div class="ctx{rep}">{"".join(spans)}</div>'


def _logit_table(record: dict[str, Any]) -> str:
    if not record["top_logits"]:
        return '<p class="muted">No logit effects: the decoder does not write the residual.</p>'
    rows = []
    pairs = zip(record["top_logits"], record["top_logit_values"], record["bottom_logits"],
                record["bottom_logit_values"], strict=True)  # fmt: skip
    for top, tv, bottom, bv in pairs:
        rows.append(
            f'<tr><td class="pos">{_shown(top)}</td><td class="n">{tv:+.3g}</td>'
            f'<td class="neg">{_shown(bottom)}</td><td class="n">{bv:+.3g}</td></tr>'
        )
    return ('<table class="logits"><tr><th>promoted</th><th class="n">logit</th>'
            f'<th>suppressed</th><th class="n">logit</th></tr>{"".join(rows)}</table>')  # fmt: skip


def latent_page(record: dict[str, Any], name: str, n_latents: int, tokens: int) -> bytes:
    """One latent: numbers, activation histogram, logit effects, top and quantile contexts."""
    j = record["index"]
    act_max = record["act_max"]
    nav = [f'<a href="../{INDEX}">index</a>']
    if j > 0:
        nav.append(f'<a href="{j - 1}.html">← {j - 1}</a>')
    if j + 1 < n_latents:
        nav.append(f'<a href="{j + 1}.html">{j + 1} →</a>')
    stats = (
        f'<p class="stats"><span>fires on <b>{100 * record["activation_frequency"]:.3g}%</b> '
        f"of tokens ({record['count']} of {tokens})</span>"
        f"<span>max <b>{_fmt(act_max)}</b></span>"
        f"<span>mean when firing <b>{_fmt(record['mean_activation'])}</b></span></p>"
    )
    parts = [f"<p>{' · '.join(nav)}</p><h1>{html.escape(name)} · latent {j}</h1>", stats]
    # The histogram and the logit tables side by side (they wrap on a narrow window).
    parts.append('<div class="row">')
    if record["count"]:
        parts.append("<div><h2>Activation histogram (when firing)</h2>")
        parts.append(bars_svg(record["histogram"], _fmt(record["act_min"]), _fmt(act_max)))
        parts.append("</div>")
    parts.append("<div><h2>Logit effects of the decoder direction</h2>")
    parts.append(_logit_table(record) + "</div></div>")
    for group in record["examples_quantiles"]:
        parts.append(f'<h2 class="quantile">{html.escape(group["quantile_name"])}</h2>')
        if not group["examples"]:
            parts.append('<p class="muted">Never fired on these tokens.</p>')
        parts.extend(context_html(e, act_max) for e in group["examples"])
    return _page(f"{name} latent {j}", "".join(parts))


def _top_token(record: dict[str, Any]) -> str:
    examples = record["examples_quantiles"][0]["examples"]
    if not examples:
        return ""
    e = examples[0]
    return e["tokens"][e["train_token_ind"]]


def _search_text(record: dict[str, Any]) -> str:
    words = {_top_token(record)}
    for e in record["examples_quantiles"][0]["examples"]:
        words.add(e["tokens"][e["train_token_ind"]])
    words.update(record["top_logits"])
    return " ".join(w.strip().lower() for w in words if w.strip())


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the index and the dictionary page need of a latent (its index row)."""
    return {
        "index": record["index"],
        "activation_frequency": record["activation_frequency"],
        "act_max": record["act_max"],
        "mean_activation": record["mean_activation"],
        "top_token": _top_token(record),
        "text": _search_text(record),
        "promotes": " ".join(t.strip() for t in record["top_logits"][:4]),
    }


def index_page(summaries: list[dict[str, Any]], name: str, caption: str) -> bytes:
    """Every latent in a table: sortable by frequency, max and mean; searchable by token."""
    rows = []
    for r in summaries:
        j = r["index"]
        rows.append(
            f'<tr data-i="{j}" data-freq="{r["activation_frequency"]:.6g}" '
            f'data-max="{r["act_max"]:.6g}" data-mean="{r["mean_activation"]:.6g}" '
            f'data-text="{html.escape(r["text"])}">'
            f'<td class="n"><a href="{LATENTS_DIR}/{j}.html">{j}</a></td>'
            f'<td class="n">{100 * r["activation_frequency"]:.3g}%</td>'
            f'<td class="n">{_fmt(r["act_max"])}</td>'
            f'<td class="n">{_fmt(r["mean_activation"])}</td>'
            f'<td class="tok">{_shown(r["top_token"])}</td>'
            f'<td class="tok">{html.escape(r["promotes"])}</td></tr>'
        )
    body = (
        f"<h1>{html.escape(name)}</h1><p>{caption} · "
        f'<a href="{DICTIONARY_PAGE}">the dictionary as a whole</a></p>'
        f'<p><input id="q" placeholder="search a token (max tokens, promoted tokens)"> '
        f'<span id="shown">{len(summaries)}</span> latents shown; click a column to sort</p>'
        '<table id="latents"><thead><tr><th class="n" data-key="i">latent</th>'
        '<th class="n" data-key="freq">frequency</th><th class="n" data-key="max">max act</th>'
        '<th class="n" data-key="mean">mean act</th><th>max token</th><th>promotes</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return _page(f"{name}: latents", body, INDEX_JS)


def dictionary_page(
    summaries: list[dict[str, Any]], name: str, about: dict[str, Any],
    metrics: dict[str, Any], dense_threshold: float,
) -> bytes:  # fmt: skip
    """The whole dictionary: density histogram, never-fired and dense counts, held-out metrics."""
    freqs = [r["activation_frequency"] for r in summaries]
    alive = [math.log10(f) for f in freqs if f > 0]
    never, dense = sum(f == 0 for f in freqs), sum(f > dense_threshold for f in freqs)
    parts = [f'<p><a href="{INDEX}">index</a></p><h1>{html.escape(name)}</h1><table>']
    parts += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
              for k, v in about.items()]  # fmt: skip
    parts.append(f"<tr><td>latents never fired here</td><td>{never} of {len(freqs)}</td></tr>")
    parts.append(f"<tr><td>dense latents (fire on &gt; {dense_threshold:g} of tokens)</td>"
                 f"<td>{dense}</td></tr></table>")  # fmt: skip
    parts.append("<h2>Feature density: log10 firing frequency of the latents that fired</h2>")
    if alive:
        lo, hi = min(min(alive), -6.0), 0.0
        bins = 50
        counts = [0] * bins
        for a in alive:
            counts[min(int((a - lo) / (hi - lo) * bins), bins - 1)] += 1
        marker = (math.log10(dense_threshold) - lo) / (hi - lo)
        parts.append(bars_svg(counts, f"{lo:.1f}", f"{hi:.1f}", 600, 120, marker))
        parts.append(f'<p class="muted">dashed line: the dense threshold {dense_threshold:g}</p>')
    parts.append("<h2>Held-out metrics (from the run)</h2>")
    if metrics:
        parts.append("<table>")
        parts += [f'<tr><td>{html.escape(k)}</td><td class="n">{v:.4g}</td></tr>'
                  for k, v in metrics.items() if isinstance(v, int | float)]  # fmt: skip
        parts.append("</table>")
    else:
        parts.append('<p class="muted">The folder records none (no saetrain_run.json).</p>')
    return _page(f"{name}: dictionary", "".join(parts))


class SiteWriter:
    """One dictionary's site, written a latent at a time: each record becomes its page at once
    and only its index row is kept, so memory holds no more than the index."""

    def __init__(self, folder: str | Path, name: str, n_latents: int, tokens: int):
        self.folder, self.name, self.n, self.tokens = Path(folder), name, n_latents, tokens
        (self.folder / LATENTS_DIR).mkdir(parents=True, exist_ok=True)
        self.summaries: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        page = latent_page(record, self.name, self.n, self.tokens)
        (self.folder / LATENTS_DIR / f"{record['index']}.html").write_bytes(page)
        self.summaries.append(summary(record))

    def finish(self, about: dict[str, Any], metrics: dict[str, Any],
               dense_threshold: float = 0.1) -> Path:  # fmt: skip
        """dictionary.html and index.html; returns the index's path."""
        page = dictionary_page(self.summaries, self.name, about, metrics, dense_threshold)
        atomic_write_bytes(self.folder / DICTIONARY_PAGE, page)
        caption = f"{len(self.summaries)} latents · {self.tokens} held-out tokens"
        atomic_write_bytes(self.folder / INDEX, index_page(self.summaries, self.name, caption))
        return self.folder / INDEX


def write_site(
    folder: str | Path,
    records: list[dict[str, Any]],
    name: str,
    about: dict[str, Any],
    metrics: dict[str, Any],
    tokens: int,
    dense_threshold: float = 0.1,
) -> Path:
    """index.html, dictionary.html and latents/<j>.html under `folder`; returns the index."""
    writer = SiteWriter(folder, name, len(records), tokens)
    for record in records:
        writer.add(record)
    return writer.finish(about, metrics, dense_threshold)


def run_index(folder: str | Path, sites: dict[str, Path]) -> Path:
    """A page linking each dictionary's site (a run folder inspected at once)."""
    folder = Path(folder)
    links = "".join(
        f'<li><a href="{html.escape(str(p.relative_to(folder)))}">{html.escape(n)}</a></li>'
        for n, p in sites.items()
    )
    path = folder / INDEX
    atomic_write_bytes(path, _page("dictionaries", f"<h1>Dictionaries</h1><ul>{links}</ul>"))
    return path
