"""``parse_html(json_data)``: the public profile page (``index.html``) generated from an ``agentprofile.json`` dict."""
from __future__ import annotations

import json
from html import escape
from typing import Any

__all__ = ["parse_html"]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return escape(json.dumps(value, ensure_ascii=False))
    return escape(str(value))


def _items(value: Any) -> str:
    if isinstance(value, dict):
        rows = "".join(f"<li><strong>{_text(k)}</strong>: {_list_or_text(v)}</li>" for k, v in value.items())
        return f"<ul>{rows}</ul>" if rows else '<p class="text-muted">-</p>'
    if isinstance(value, list):
        rows = "".join(f"<li>{_list_or_text(v)}</li>" for v in value)
        return f"<ul>{rows}</ul>" if rows else '<p class="text-muted">-</p>'
    return f"<p>{_text(value)}</p>"


def _list_or_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return _text(value)


def parse_html(json_data) -> str:
    """A self-contained Bootstrap page describing the agent profile ``json_data`` (dict or JSON string)."""
    if isinstance(json_data, (str, bytes)):
        try:
            json_data = json.loads(json_data)
        except ValueError:
            json_data = {"description": json_data}
    data = json_data if isinstance(json_data, dict) else {}
    name = _text(data.get("name") or "Agent")
    ava = data.get("avaUrl") or ""
    ava_html = (
        f'<img src="{escape(str(ava), quote=True)}" alt="avatar" class="rounded me-3" width="96" height="96">'
        if isinstance(ava, str) and ava.startswith(("http://", "https://"))
        else ""
    )
    sections = []
    for key, title in (
        ("publisherInfo", "Publisher"),
        ("capabilities", "Capabilities"),
        ("llm", "Model"),
        ("references", "References"),
        ("authorization", "Authorization"),
        ("input", "Input"),
        ("output", "Output"),
        ("permission", "Permission"),
    ):
        if key in data:
            sections.append(
                f'<div class="card mb-3"><div class="card-header">{title}</div>'
                f'<div class="card-body">{_items(data[key])}</div></div>'
            )
    flags = []
    for key, label in (("supportStream", "streaming"), ("supportAsync", "async")):
        if key in data:
            flags.append(f'<span class="badge bg-{"success" if data[key] else "secondary"} me-1">{label}</span>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{name}</title>\n"
        "<link rel=\"stylesheet\" href=\"https://cdn.jsdelivr.net/npm/bootstrap@5.3.3/dist/css/bootstrap.min.css\">\n"
        "</head>\n<body class=\"bg-light\">\n<div class=\"container py-4\">\n"
        f"<div class=\"d-flex align-items-center mb-4\">{ava_html}<div><h1 class=\"h3\">{name}</h1>"
        f"<p class=\"text-muted mb-1\">{_text(data.get('description'))}</p>"
        f"<small>version {_text(data.get('version'))} &middot; updated {_text(data.get('lastUpdated'))}</small>"
        f"<div class=\"mt-2\">{''.join(flags)}</div></div></div>\n"
        + "\n".join(sections)
        + "\n</div>\n</body>\n</html>\n"
    )
