"""The system tools some tests need, how to tell they work, and the apt package that brings each.

One table, so that every test needing a tool skips the same way on a machine without it: a
one-line reason naming the ``apt-get install`` that fixes it (Debian/Ubuntu package names), and
``.ci/run`` installs the same packages. Tests say what they need with
``@pytest.mark.tools("iptables", "ip")`` (``tests/conftest.py`` turns it into the skip); code
that must decide mid-test uses :func:`missing` / :func:`skip_reason` directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["TOOLS", "Tool", "find", "missing", "skip_reason", "install_hint"]

PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Tool:
    """A system tool: any one of ``commands`` found on PATH (and answering ``probe``) will do.

    Attributes:
        name: what tests ask for (``@pytest.mark.tools(name)``).
        commands: alternatives, each an argv prefix (``("docker", "compose")``); the first that
            works is the one tests run.
        package: the apt package that brings it.
        probe: arguments appended to a command that must then exit 0 (a client that is on PATH
            but broken, like ``docker`` without its compose plugin, does not count).
    """

    name: str
    commands: tuple[tuple[str, ...], ...]
    package: str
    probe: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.commands or any(not c for c in self.commands):
            raise ValueError(f"tool {self.name!r}: give at least one non-empty command")


def _tool(name: str, package: str, *commands: str | tuple[str, ...], probe: tuple[str, ...] = ()) -> Tool:
    argvs = tuple((c,) if isinstance(c, str) else c for c in (commands or (name,)))
    return Tool(name=name, commands=argvs, package=package, probe=probe)


TOOLS: dict[str, Tool] = {t.name: t for t in (
    _tool("iptables", "iptables"),
    _tool("nft", "nftables"),
    _tool("ip", "iproute2", probe=("netns", "list")),  # busybox's ip has no netns
    _tool("tc", "iproute2"),
    _tool("sysctl", "procps"),
    _tool("chromium", "chromium", "chromium", "chromium-browser", "google-chrome"),
    _tool("chromedriver", "chromium-driver"),
    _tool("docker-compose", "docker-compose", ("docker", "compose"), "docker-compose", probe=("version",)),
)}


def find(name: str, *, path: str | None = None) -> tuple[str, ...] | None:
    """The working command for tool ``name`` (first word resolved to a full path), or None.

    Args:
        name: a key of :data:`TOOLS`.
        path: the search path (default: ``$PATH``, what ``subprocess`` would use).

    Raises:
        KeyError: ``name`` is not in the table (add it there, with its apt package).
    """
    tool = TOOLS[name]
    for argv in tool.commands:
        exe = shutil.which(argv[0], path=path)
        if exe is None:
            continue
        if tool.probe and not _answers([exe, *argv[1:], *tool.probe], path):
            continue
        return (exe, *argv[1:])
    return None


def _answers(argv: list[str], path: str | None) -> bool:
    env = None if path is None else {**os.environ, "PATH": path}
    try:
        return subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, env=env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def missing(names: tuple[str, ...] | list[str], *, path: str | None = None) -> list[Tool]:
    """The tools among ``names`` that this machine lacks, in the order asked."""
    return [TOOLS[n] for n in names if find(n, path=path) is None]


def install_hint(tools: list[Tool]) -> str:
    """``apt-get install pkg1 pkg2`` for ``tools`` (each package once)."""
    return "apt-get install " + " ".join(dict.fromkeys(t.package for t in tools))


def skip_reason(tools: list[Tool]) -> str:
    """One line: which tools are missing and the apt-get command that brings them."""
    return f"needs {', '.join(t.name for t in tools)}: {install_hint(tools)}"
