"""The `hyphae` command starts without torch: every command (and the daemon, which is `hyphae node
join`) would otherwise pay ~1-2 s and ~300 MB for it, and a testnet of daemons started one after
another drifts seconds apart (the 4-daemon SPES test then saw mismatched first rounds)."""

import subprocess
import sys

HEAVY = ("torch", "safetensors", "tokenizers", "transformers", "pyarrow")


def test_importing_the_cli_and_the_daemon_loads_no_torch() -> None:
    code = ("import sys, hyphae.cli.main, hyphae.node.daemon, hyphae.node.foreground; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"the CLI imported {out.stdout.strip()}"
