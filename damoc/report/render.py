"""report.md and report.html from one list of blocks, so both say the same thing.

Blocks: ("h1"|"h2"|"p", text), ("table", headers, rows), ("img", file, caption), ("code", text, language).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

Block = tuple[Any, ...]

STYLE = """body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;margin:.5em 0}
figcaption{font-size:.85em;color:#555}.failed{color:#b00}
pre{background:#f6f6f6;border:1px solid #ddd;padding:.6em .8em;overflow-x:auto;font-size:.9em}"""


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(f"{b[1]}\n")
        elif kind == "table":
            headers, rows = b[1], b[2]
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
        elif kind == "code":
            out.append(f"```{b[2]}\n{b[1].rstrip()}\n```\n")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str, folder: Path | None = None) -> str:
    """The report as one page that stands alone: with `folder`, its images are embedded (data URIs), so a
    copied report.html still shows every plot."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td{' class=num' if _numeric(c) else ''}>{e(fmt(c))}</td>" for c in row)
                           + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            src = b[1]
            if folder is not None and (folder / b[1]).is_file():
                src = "data:image/png;base64," + base64.b64encode((folder / b[1]).read_bytes()).decode()
            body.append(f'<figure><img src="{e(src)}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
        elif kind == "code":
            body.append(f'<pre><code class="language-{e(b[2])}">{e(b[1].rstrip())}</code></pre>')
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
