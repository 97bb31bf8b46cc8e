"""Every ```python block of README.md runs, so the README stays true.

Each block runs as its own script in a subprocess, in a fresh empty folder, with ``AGENTCP_AP_URL`` pointing at a
local devserver (started once for this module), so agent code in the README talks to the local network.

How a block is run is chosen by an HTML comment on the line right before its opening fence (invisible on GitHub):

* no comment: the block must exit 0 within 60 s, with no traceback;
* ``<!-- run: serve -->``: a long-running agent (ends in ``serve_forever()``): it must print a first line and
  still be running a second later, with no traceback; then it is stopped;
* ``<!-- run: pytest -->``: a test module (using the ``acp_server`` fixtures): ``python -m pytest`` on it must pass;
* ``<!-- not-run: why -->``: not run (a fragment or placeholders); the reason is shown as the skip reason.
  Use sparingly: every skipped block is a block that can silently go stale.

``README_TEST_FILE=path/to/draft.md python -m pytest tests/test_readme.py`` checks another Markdown file the same way.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
from _subproc import run_until_ready

ROOT = Path(__file__).resolve().parent.parent
README = Path(os.environ.get("README_TEST_FILE") or ROOT / "README.md")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|run)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block: its language, first line number (1-based, the fence), code and run mode."""

    lang: str
    line: int
    code: str
    mode: str = "run"  # "run", "serve", "pytest" or "skip"
    reason: str = ""


def extract_blocks(text: str) -> List[Block]:
    """Fenced code blocks of a Markdown text, with the run mode from an HTML comment right before the fence."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group("fence"), match.group("info").strip().split(" ")[0].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        block = Block(lang=lang, line=start + 1, code="\n".join(body) + "\n")
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = _MARKER.match(lines[prev]) if prev >= 0 else None
        if marker and marker.group("kind") == "not-run":
            block.mode, block.reason = "skip", marker.group("arg") or "marked not-run"
        elif marker and marker.group("kind") == "run":
            arg = (marker.group("arg") or "").strip()
            if arg not in ("serve", "pytest", ""):
                raise ValueError(f"line {prev + 1}: unknown run mode {arg!r} (known: serve, pytest)")
            block.mode = arg or "run"
        blocks.append(block)
    return blocks


def python_blocks() -> List[Block]:
    return [b for b in extract_blocks(README.read_text(encoding="utf-8")) if b.lang in ("python", "py", "python3")]


def test_extract_blocks_and_markers():
    text = (
        "intro\n\n```python\nprint(1)\n```\n\n<!-- not-run: a fragment -->\n```python\n...\n```\n"
        "<!-- run: serve -->\n\n```python\nserve()\n```\n````bash\necho\n```\n````\n~~~py\nx = 1\n~~~\n"
    )
    blocks = extract_blocks(text)
    assert [(b.lang, b.mode, b.line) for b in blocks] == [
        ("python", "run", 3), ("python", "skip", 8), ("python", "serve", 13), ("bash", "run", 16), ("py", "run", 20)]
    assert blocks[0].code == "print(1)\n" and blocks[1].reason == "a fragment"
    assert blocks[3].code == "echo\n```\n"
    with pytest.raises(ValueError):
        extract_blocks("<!-- run: sometimes -->\n```python\npass\n```\n")


def test_readme_has_python_blocks():
    assert python_blocks(), "README.md has no python blocks (or the extractor broke)"


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the test command the README gives a contributor."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r'^(pip install -e "\.\[test\]" && python -m pytest)\s*(#.*)?$', text, re.M)
    assert match, "README.md no longer shows the test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.strip() == match.group(1) for line in ci.splitlines()), ".ci/run does not run it verbatim"


@pytest.fixture(scope="module")
def devserver_url():
    from agentcp.testing.devserver import start_dev_network

    server, access_point = start_dev_network(port=0)
    try:
        yield access_point.url
    finally:
        server.stop()


def _env(devserver_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTCP_", "PYTHONPATH"))}
    env.update(AGENTCP_AP_URL=devserver_url, PYTHONUNBUFFERED="1")
    return env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block_runs(block: Block, tmp_path, request):
    if block.mode == "skip":
        pytest.skip(f"README.md:{block.line} marked not-run: {block.reason}")
    url = request.getfixturevalue("devserver_url")
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    where = f"README.md line {block.line} ({block.mode})"
    if block.mode == "serve":
        running, out, err = run_until_ready([sys.executable, script.name], str(tmp_path), _env(url), then=1.0,
                                            stop=signal.SIGINT)
        assert out and running and "Traceback" not in err, f"{where}\n--- stdout\n{out}\n--- stderr\n{err[-3000:]}"
        return
    args = [sys.executable, script.name]
    if block.mode == "pytest":
        script = script.rename(tmp_path / "test_readme_block.py")
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", script.name]
    proc = subprocess.run(args, cwd=str(tmp_path), env=_env(url), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (
        f"{where} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-3000:]}")
