"""Maintainer checks, one nox session each; `.ci/run` runs them all.

    nox -s tests-3.9 tests-3.13   # the test suite on the oldest and newest supported Python
    nox -s lint types             # ruff and mypy with the rule sets in pyproject.toml
    nox -s package                # build sdist + wheel, twine check, install the wheel into a clean venv, smoke test
    nox -s upgrade                # upgrade in place from the published agentcp 0.1.99 (tests/test_upgrade.py)

Interpreters: nox looks for ``python3.X`` on PATH; pyenv installs under ``~/.pyenv/versions`` are added to PATH
here, so the sessions find them without ``pyenv global``. The tool versions are pinned (in the ``dev`` extra of
pyproject.toml too), so a new ruff or mypy release cannot turn CI red by itself.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.9", "3.13"]
RUFF = "ruff==0.17.6"
MYPY = ["mypy==1.20.2", "types-requests"]

nox.options.sessions = ["lint", "types", "tests", "package", "upgrade"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _add_pyenv_interpreters() -> None:
    """Put ``~/.pyenv/versions/<v>/bin`` on PATH for every wanted version that is not there yet."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    extra = []
    for version in PYTHONS:
        if shutil.which(f"python{version}") and not _is_pyenv_shim(f"python{version}"):
            continue
        for candidate in sorted(glob.glob(str(root / f"{version}.*" / "bin")), reverse=True):
            if (Path(candidate) / f"python{version}").exists():
                extra.append(candidate)
                break
    if extra:
        os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])


def _is_pyenv_shim(name: str) -> bool:
    path = shutil.which(name) or ""
    return "/shims/" in path  # a pyenv shim refuses versions that are not activated


_add_pyenv_interpreters()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite (editable install, as a contributor has it), plus the interop tests that run the published
    0.1.99 as a peer (deselected from the plain command, which stays fast)."""
    session.install("-e", ".[test]")
    # In CI the interop tests with the published 0.1.99 must run, not skip (tests/peer0199.py).
    env = {"AGENTCP_0199_REQUIRED": "1"} if os.environ.get("CI") else {}
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not upgrade",
                *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(RUFF)
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session
def types(session: nox.Session) -> None:
    """mypy on agentcp/ (config: [tool.mypy] in pyproject.toml), with the runtime and test dependencies installed."""
    session.install("-e", ".[test]", *MYPY)
    session.run("mypy", *session.posargs)
    # The examples are user code: through py.typed they type-check against the public API.
    session.run("mypy", "--ignore-missing-imports", "examples")  # openai is optional there


FORBIDDEN_IN_WHEEL = ("tests/", "benchmarks/", "examples/", "__pycache__", ".pyc", ".pytest_cache", ".mypy_cache",
                      ".ruff_cache", ".nox/", ".venv")


def check_wheel(wheel: Path) -> None:
    """The wheel holds the package (with py.typed) and nothing else: no tests, benchmarks or caches."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    bad = [n for n in names if any(part in n for part in FORBIDDEN_IN_WHEEL)]
    foreign = [n for n in names if not (n.startswith("agentcp/") or n.startswith("agentcp-"))]
    assert not bad, f"wheel holds files it must not: {bad[:10]}"
    assert not foreign, f"wheel holds files outside the package: {foreign[:10]}"
    assert "agentcp/py.typed" in names, "py.typed missing from the wheel"
    assert "agentcp/testing/devserver.py" in names, "agentcp.testing missing from the wheel"


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    bad = [n for n in names if any(part in n for part in ("__pycache__", ".pyc", "_cache", ".nox/", ".venv"))]
    assert not bad, f"sdist holds caches: {bad[:10]}"
    assert any(n.endswith("agentcp/py.typed") for n in names), "py.typed missing from the sdist"


@nox.session
def package(session: nox.Session) -> None:
    """Build sdist + wheel, twine check, inspect them, install the wheel into a clean venv and smoke-test it."""
    session.install("build>=1.0", "twine>=5")
    with tempfile.TemporaryDirectory(prefix="agentcp-package-") as tmp:
        dist = Path(tmp) / "dist"
        session.run("python", "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), ".", silent=True)
        wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
        assert len(wheels) == 1 and len(sdists) == 1, sorted(dist.iterdir())
        session.run("twine", "check", "--strict", str(wheels[0]), str(sdists[0]))
        check_wheel(wheels[0])
        check_sdist(sdists[0])
        session.log("wheel and sdist contents ok")

        venv = Path(tmp) / "clean-venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        session.run(py, "-m", "pip", "install", "--quiet", str(wheels[0]), external=True)
        # From an empty folder, so the source tree cannot be what gets imported.
        home = Path(tmp) / "elsewhere"
        home.mkdir()
        with session.chdir(str(home)):
            session.run(py, "-c",
                        "import agentcp, pathlib, sys; p = pathlib.Path(agentcp.__file__).resolve(); "
                        f"assert str(p).startswith({str(venv.resolve())!r}), p; "
                        "assert (p.parent / 'py.typed').exists(); "
                        "from agentcp import AgentCP, AgentID; print('imported', agentcp.__version__, 'from', p)",
                        external=True)
            session.run(py, "-m", "agentcp", "demo", "--quick", external=True)


@nox.session
def upgrade(session: nox.Session) -> None:
    """Upgrade in place from agentcp 0.1.99 (tests/test_upgrade.py; needs PyPI)."""
    session.install("-e", ".[test]")
    env = {"AGENTCP_UPGRADE_REQUIRED": "1"} if os.environ.get("CI") else {}
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "upgrade", "tests/test_upgrade.py",
                *session.posargs, env=env)
