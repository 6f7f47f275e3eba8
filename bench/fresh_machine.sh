#!/usr/bin/env bash
# A new user's first run: clone the repo into a temp dir, run the README's two test commands
# exactly (install + default tier, then the slow tier), and print the wall time of each.
#
#   bash bench/fresh_machine.sh                        # both tiers
#   bash bench/fresh_machine.sh --default-only         # just the README's first command
#   bash bench/fresh_machine.sh --hide iptables,chromedriver   # as on a machine without them
#   bash bench/fresh_machine.sh --json bench/results/fresh_machine.json
#
# It clones the last commit (HEAD), not uncommitted changes. `--hide` runs both commands with a
# PATH on which those tools do not exist (a folder of links to everything else on PATH), so the
# tests that need them must skip, each naming its apt-get line; the skipped tests are listed.
# Baseline: none is meaningful for a wall time of a whole suite; the 8-minute budget of the
# default tier (README) is the reference, and the ratio to it is printed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUDGET_S=480
HIDE="" JSON="" SLOW=1 KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --hide) HIDE="$2"; shift 2 ;;
        --json) JSON="$2"; shift 2 ;;
        --default-only) SLOW=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ -z "$JSON" ] || JSON="$(realpath -m "$JSON")"
WORK="$(mktemp -d -t hyphae-fresh.XXXXXX)"
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
git clone --quiet "$REPO" "$WORK/hyphae"
cd "$WORK/hyphae"
echo "fresh clone of $(git rev-parse --short HEAD) in $WORK/hyphae, $(nproc) cores, uid $(id -u)"

if [ -n "$HIDE" ]; then
    shim="$WORK/path"
    mkdir -p "$shim"
    IFS=: read -ra dirs <<<"$PATH"
    for d in "${dirs[@]}"; do
        for f in "$d"/*; do
            name="$(basename "$f")"
            [ -x "$f" ] && [ ! -d "$f" ] && [ ! -e "$shim/$name" ] && ln -s "$f" "$shim/$name"
        done
    done
    IFS=, read -ra hidden <<<"$HIDE"
    for name in "${hidden[@]}"; do rm -f "$shim/$name"; done
    export PATH="$shim"
    echo "PATH without: $HIDE"
fi

export HYPHAE_SKIP_REPORT="$WORK/skips.jsonl"
: >"$HYPHAE_SKIP_REPORT"

timed() {  # $1: label, then the command as one string, run by this shell (the venv stays active)
    local label="$1" start rc
    start=$(date +%s.%N)
    set +e
    eval "$2" >"$WORK/$label.log" 2>&1
    rc=$?
    set -e
    local wall
    wall=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
    tail -n 3 "$WORK/$label.log" | sed "s/^/  [$label] /"
    echo "$label: exit $rc, wall $wall s"
    eval "RC_${label}=$rc WALL_${label}=$wall"
}

# --- the README's test commands, verbatim ---
timed default "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[test]' && python -m pytest"
if [ "$SLOW" = 1 ]; then
    timed slow "python -m pytest -m slow -n 0"
else
    RC_slow="" WALL_slow=""
fi

python3 - "$HYPHAE_SKIP_REPORT" "$BUDGET_S" "$RC_default" "$WALL_default" "$RC_slow" "$WALL_slow" "$HIDE" \
    "${JSON:-}" "$(nproc)" <<'EOF'
import json
import sys
from pathlib import Path

skips_path, budget, rc_d, wall_d, rc_s, wall_s, hide, out, cores = sys.argv[1:]
skips = [json.loads(line) for line in open(skips_path, encoding="utf-8") if line.strip()]
gpu = [r for r in skips if "gpu" in r["markers"] or "CUDA" in r["reason"]]
print(f"{len(skips)} skipped: {len(gpu)} need a CUDA GPU; the others:")
for r in skips:
    if r not in gpu:
        print(f"  {r['nodeid']}: {r['reason']}")
# the install is part of the first command; the 8-minute budget is for the tests alone, which
# pytest's own closing line times ("in 412.3s")
result = {"cores": int(cores), "hidden_tools": [t for t in hide.split(",") if t],
          "default": {"exit": int(rc_d), "wall_s": float(wall_d), "budget_s": float(budget),
                      "ratio_to_budget": round(float(wall_d) / float(budget), 3)},
          "slow": {"exit": int(rc_s), "wall_s": float(wall_s)} if rc_s else None,
          "skipped": skips}
print(f"default tier (install included): {float(wall_d):.0f} s, {float(wall_d) / float(budget):.2f}x the "
      f"{float(budget):.0f} s budget; exit {rc_d}" + (f"; slow tier: {float(wall_s):.0f} s, exit {rc_s}" if rc_s else ""))
if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
sys.exit(0 if rc_d == "0" and rc_s in ("", "0") else 1)
EOF
