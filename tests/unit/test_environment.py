"""Which system tools this machine has, and that a missing one turns into a skip naming its package.

The listing is printed (``-s``) and written to ``test-artifacts/environment.json`` (or
``$HYPHAE_TEST_ARTIFACTS``), so a CI log shows what ran where. The other tests hide a tool by
running the real detection (``tests/_requires.py``) on a PATH without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import _requires
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HYPHAE_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _path_without(tmp_path: Path, *hidden: str) -> str:
    """A PATH dir linking every table command that is installed here, except ``hidden`` ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in _requires.TOOLS.values():
        for argv in tool.commands:
            found = shutil.which(argv[0])
            if found and argv[0] not in hidden and not (bin_dir / argv[0]).exists():
                (bin_dir / argv[0]).symlink_to(found)
    return str(bin_dir)


def test_lists_which_system_tools_are_present() -> None:
    listing = {name: {"package": tool.package, "command": " ".join(found) if (found := _requires.find(name)) else None}
               for name, tool in _requires.TOOLS.items()}
    for name, row in listing.items():
        if row["command"]:
            assert os.access(row["command"].split()[0], os.X_OK), name
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "environment.json").write_text(json.dumps({"root": os.geteuid() == 0, "tools": listing}, indent=1))
    print("\nsystem tools:")
    for name, row in listing.items():
        print(f"  {name:15} {row['command'] or 'missing: apt-get install ' + row['package']}")


def test_a_tool_hidden_from_path_is_missing_and_the_reason_names_its_apt_package(tmp_path: Path) -> None:
    path = _path_without(tmp_path, "iptables", "chromedriver")
    lacking = _requires.missing(["iptables", "chromedriver", "sysctl"], path=path)
    assert [t.name for t in lacking] == ["iptables", "chromedriver"]
    assert _requires.skip_reason(lacking) == "needs iptables, chromedriver: apt-get install iptables chromium-driver"


def test_a_client_on_path_that_fails_its_probe_does_not_count(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"  # a docker without its compose plugin: `docker compose version` fails
    docker.write_text("#!/bin/sh\nexit 1\n")
    docker.chmod(0o755)
    assert _requires.find("docker-compose", path=str(bin_dir)) is None
    docker.write_text("#!/bin/sh\n[ \"$1 $2\" = 'compose version' ]\n")
    assert _requires.find("docker-compose", path=str(bin_dir)) == (str(docker), "compose")


def test_each_package_is_named_once_in_the_install_hint() -> None:
    tools = [_requires.TOOLS["ip"], _requires.TOOLS["tc"], _requires.TOOLS["iptables"]]
    assert _requires.install_hint(tools) == "apt-get install iproute2 iptables"


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A scratch test dir with this suite's conftest and tool table, run in this process."""
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    (pytester.path / "_requires.py").write_text((REPO / "tests" / "_requires.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                     "markers =\n    slow: x\n    root: x\n    tools: x\n    gpu: x\n")
    return pytester


def test_a_tools_test_skips_with_the_apt_line_and_lands_in_the_skip_report(
        suite: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite.makepyfile(test_fw="""
        import pytest

        @pytest.mark.tools("iptables", "ip")
        def test_needs_the_firewall():
            pass

        def test_needs_nothing():
            pass
    """)
    report = tmp_path / "skips.jsonl"
    monkeypatch.setenv("PATH", _path_without(tmp_path, "iptables"))
    monkeypatch.setenv("HYPHAE_SKIP_REPORT", str(report))
    result = suite.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*needs iptables: apt-get install iptables"])
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert rows == [{"nodeid": "test_fw.py::test_needs_the_firewall", "markers": ["tools"],
                     "reason": "needs iptables: apt-get install iptables", "required_in_ci": True}]


def test_the_default_tier_leaves_out_slow_tests_and_dash_m_slow_or_all_runs_them(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_tiers="""
        import pytest

        def test_quick():
            pass

        @pytest.mark.slow
        def test_long():
            pass
    """)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, deselected=1)
    suite.runpytest("-p", "no:cacheprovider", "-m", "slow").assert_outcomes(passed=1, deselected=1)
    suite.runpytest("-p", "no:cacheprovider", "--all").assert_outcomes(passed=2)
    suite.runpytest("-p", "no:cacheprovider", "test_tiers.py::test_long").assert_outcomes(passed=1)


def test_no_test_looks_for_a_system_tool_by_itself() -> None:
    """Every tool check goes through tests/_requires.py, so every such test skips the same way."""
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py")
                 if p.name not in ("_requires.py", "test_environment.py")
                 and "shutil.which(" in p.read_text()]
    assert not offenders, f"use _requires.find / @pytest.mark.tools instead of shutil.which in {offenders}"


@pytest.mark.parametrize("tool", sorted(_requires.TOOLS))
def test_ci_installs_the_package_of_every_tool(tool: str) -> None:
    package = _requires.TOOLS[tool].package
    packages = re.search(r"^PACKAGES=\(([^)]*)\)$", (REPO / ".ci" / "run").read_text(), re.M)
    assert packages, ".ci/run lists what it installs in one PACKAGES=(...) line"
    assert package in packages.group(1).split(), f".ci/run must install {package} so CI runs the tests needing {tool}"
