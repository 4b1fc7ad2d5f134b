"""Small HTML pieces every section of report.html uses: metric text, tables, lists.

Every value is escaped; the pieces build text only from the numbers they are given.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["ci_text", "html_table", "bullet_list"]


def ci_text(block: dict | None, digits: int = 3) -> str:
    """``0.812 [0.701, 0.903]`` for a metric block, or ``undefined (reason)``."""
    if not block or block.get("value") is None:
        return f"undefined ({(block or {}).get('reason', 'not computed')})"
    text = f"{block['value']:.{digits}f}"
    if block.get("ci_low") is not None:
        text += f" [{block['ci_low']:.{digits}f}, {block['ci_high']:.{digits}f}]"
    return text


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """A table with one header row; every cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bullet_list(lines: list[str]) -> str:
    """An unordered list of escaped sentences."""
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
