"""``Mermaid``: a small parser for Mermaid ``graph`` text (nodes and labelled edges), used by :class:`Workflow`."""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional, Tuple

_log = logging.getLogger("agentcp.workflow")

__all__ = ["Mermaid"]

_REJECTED = ("pie", "sequencediagram", "gantt", "classdiagram", "statediagram", "erdiagram", "journey")
_HEADER = re.compile(r"^(graph|flowchart)\b\s*([A-Za-z]{2})?\s*;?\s*$", re.IGNORECASE)
_NODE = re.compile(
    r"^(?P<id>[^\s\[\]\(\)\{\}:;|>-]+)\s*"
    r"(?:\[(?P<sq>[^\]]*)\]|\((?P<rd>[^\)]*)\)|\{(?P<cu>[^\}]*)\})?"
    r"(?::::(?P<cls>\S+))?\s*;?\s*$"
)
_EDGE_PIPE = re.compile(r"^(?P<src>.+?)--?>\|(?P<desc>[^|]*)\|(?P<dst>.+)$")
_EDGE_TEXT = re.compile(r"^(?P<src>.+?)--(?P<desc>[^->][^>]*?)-->(?P<dst>.+)$")
_EDGE_LONG = re.compile(r"^(?P<src>.+?)-->(?P<dst>.+)$")
_EDGE_SHORT = re.compile(r"^(?P<src>.+?)->(?P<dst>.+)$")


def _split_inline(token: str) -> Tuple[str, Optional[str]]:
    """``A[desc]`` -> ("A", "desc"); a bare id -> (id, None)."""
    m = _NODE.match(token)
    if not m:
        return token, None
    desc = m.group("sq")
    if desc is None:
        desc = m.group("rd")
    if desc is None:
        desc = m.group("cu")
    return m.group("id"), desc


class Mermaid:
    """Parse ``content`` (Mermaid ``graph`` text) right away.

    Attributes: ``mermaid_code``, ``graph_type`` ("graph" or None), ``graph_direction`` (e.g. "TD"), ``nodes``
    (node descriptions in order of appearance), ``node_dict`` (id -> description), ``node_styles`` (id -> class
    given with ``:::class``) and ``edges`` (``(source, description, target)``; spaces removed, inline node syntax
    kept in the ids). Works before any ``AgentCP`` exists (0.1.99 raised AttributeError).
    """

    def __init__(self, content) -> None:
        self.mermaid_code: str = content if isinstance(content, str) else ("" if content is None else str(content))
        self.graph_type: Optional[str] = None
        self.graph_direction: Optional[str] = None
        self.nodes: List[str] = []
        self.node_dict: Dict[str, str] = {}
        self.node_styles: Dict[str, str] = {}
        self.edges: List[Tuple[str, str, str]] = []
        self.parse_mermaid()

    @classmethod
    def from_file(cls, dir_path, file_name) -> "Mermaid":
        """``Mermaid`` of ``<dir_path>/<file_name>.mmd`` (a missing file gives an empty graph)."""
        return cls(Mermaid.read_mermaid_code(dir_path, file_name))

    def read_mermaid_code(dir_path: str, file_name: str) -> str:  # type: ignore[misc]  # noqa: N805 - plain function, as in 0.1.99
        """The text of ``<dir_path>/<file_name>.mmd`` with ``&nbsp;`` and NBSP removed; ``""`` if unreadable."""
        path = os.path.join(dir_path, f"{file_name}.mmd")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            _log.error("cannot read mermaid file %s: %s", path, exc)
            return ""
        return text.replace("&nbsp;", "").replace("\u00a0", "")

    # --- parser ------------------------------------------------------------------------------------------------
    def parse_mermaid(self) -> None:
        lines = [ln.strip() for ln in self.mermaid_code.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("%%")]
        if not lines:
            return
        first = lines[0]
        header = _HEADER.match(first)
        if not header:
            kind = first.split()[0].lower() if first.split() else ""
            if kind in _REJECTED:
                _log.error("unsupported mermaid diagram type %r (only 'graph' is supported)", first.split()[0])
            else:
                _log.error("mermaid text does not start with 'graph': %r", first)
            return
        self.graph_type = "graph"
        self.graph_direction = (header.group(2) or "TD").upper()
        _log.debug("mermaid graph, direction %s", self.graph_direction)
        for line in lines[1:]:
            if line.lower() in ("end",) or line.lower().startswith(("classdef ", "class ", "style ", "subgraph")):
                continue
            if "->" in line:
                self.parse_edge(line)
            else:
                self.parse_node(line)

    def parse_node(self, line) -> None:
        m = _NODE.match(line.strip())
        if not m:
            _log.debug("mermaid: ignored line %r", line)
            return
        node_id, desc = _split_inline(line.strip())
        if desc is None:
            desc = node_id
        if node_id not in self.node_dict:
            self.nodes.append(desc)
        self.node_dict[node_id] = desc
        if m.group("cls"):
            self.node_styles[node_id] = m.group("cls")
        _log.debug("mermaid node %s: %s", node_id, desc)

    def parse_edge(self, line) -> None:
        text = re.sub(r"\s+", "", line).rstrip(";")
        for pattern in (_EDGE_PIPE, _EDGE_TEXT, _EDGE_LONG, _EDGE_SHORT):
            m = pattern.match(text)
            if m:
                desc = m.groupdict().get("desc") or ""
                edge = (m.group("src"), desc, m.group("dst"))
                self.edges.append(edge)
                for token in (edge[0], edge[2]):
                    node_id, node_desc = _split_inline(token)
                    if node_desc is not None and node_id not in self.node_dict:
                        self.node_dict[node_id] = node_desc
                        self.nodes.append(node_desc)
                _log.debug("mermaid edge %s --%s--> %s", *edge)
                return
        _log.debug("mermaid: ignored edge line %r", line)
