"""run_scenario's checks before anything starts: a missing system tool is its own error."""

from __future__ import annotations

from pathlib import Path

import _requires
import pytest

from hyphae.node.scenarios import SCENARIOS, MissingTool, ScenarioError, run_scenario


def _path_without(tmp_path: Path, hidden: str) -> str:
    """A PATH holding links to python and the scenario tools except ``hidden``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("iptables", "ip", "tc", "sysctl"):
        found = _requires.find(tool)
        if tool != hidden and found:
            (bin_dir / tool).symlink_to(found[0])
    return str(bin_dir)


@pytest.mark.parametrize("name", sorted(n for n, s in SCENARIOS.items() if s.tools))
def test_a_scenario_whose_tool_is_missing_raises_missing_tool_naming_the_package_and_starts_nothing(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without(tmp_path, "iptables"))
    with pytest.raises(MissingTool, match=r"^iptables is not installed; apt-get install iptables$") as err:
        run_scenario(name, root=tmp_path / "run")
    assert (err.value.tool, err.value.package) == ("iptables", "iptables")
    assert not (tmp_path / "run").exists()


def test_failures_other_than_a_missing_tool_are_not_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as err:
        run_scenario("nope", root=tmp_path)
    assert not isinstance(err.value, MissingTool)


def test_every_scenario_that_touches_the_firewall_declares_iptables() -> None:
    for name, scenario in SCENARIOS.items():
        if scenario.firewall or scenario.link_emulator or scenario.placement:
            assert "iptables" in scenario.tools, name
