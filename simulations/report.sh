#!/usr/bin/env bash
# Regenerates docs/benchmarks.md and docs/benchmarks-completion.svg from fresh runs, in
# one go: the release build, the netns emulation (edge, incluster, churn and
# edge-containerd with direct, swarm, libtorrent), the simulator at 1,000 nodes x 1 GiB
# (edge and in-cluster, upload rates spread +-50 % around 200 Mbit/s, its other settings
# at their defaults) and at 10,000 nodes (edge), then swarm-report. The
# raw JSON and the exact commands (commands.sh) go to simulations/results/, the report
# reads them from there.
#
# Needs root for the emulation (network namespaces), Debian's docker-registry,
# containerd, python3-libtorrent and iproute2: see simulations/emulate/README.md. About
# 4 minutes on the 2-core machine for the emulation and the 1,000-node runs, plus about
# 8 for the 10,000-node run (SIM_LARGE) and 2 for the simulator's LTO build.
#
# Environment:
#   RESULTS=DIR        where the JSON goes (default simulations/results)
#   SIM_NODES="N ..."  simulator sizes, edge and in-cluster (default "1000")
#   SIM_LARGE="N ..."  simulator sizes, edge only (default "10000"; "" for none)
#   SIM_SPREAD=S       node upload rates uniform in 200 Mbit/s x [1-S, 1+S] (default 0.5)
#   SIM_BLOB=SIZE      simulator blob (default 1GiB)
#   SKIP_EMULATION=1   keep DIR/emulate.json and its command from the last run
#   SKIP_SIM=1         keep DIR/sim-*.json and their commands from the last run
#   EMULATE_ARGS="..." extra arguments for emulate.py run (e.g. "--repeat 3 --calibrate")
set -euo pipefail
cd "$(dirname "$0")/.."

results=${RESULTS:-simulations/results}
sim_nodes=${SIM_NODES:-1000}
sim_large=${SIM_LARGE-10000}
sim_spread=${SIM_SPREAD:-0.5}
sim_blob=${SIM_BLOB:-1GiB}
mkdir -p "$results"
commands="$results/commands.sh"
touch "$commands"
new_commands=$(mktemp)
trap 'rm -f "$new_commands"' EXIT

# A command line as a shell would read it back: plain words as they are, others quoted.
quote() {
    local out="" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    printf '%s' "${out% }"
}

# run OUT CMD...: record the command, run it (stdout to OUT unless OUT is -).
run() {
    local out=$1
    shift
    local line
    line=$(quote "$@")
    if [[ $out == - ]]; then
        echo "$line" >>"$new_commands"
        echo "+ $line" >&2
        "$@"
    else
        echo "$line > $out" >>"$new_commands"
        echo "+ $line > $out" >&2
        "$@" >"$out"
    fi
}

# keep PATTERN: carry the lines of the previous commands.sh that mention PATTERN.
keep() { grep -F -- "$1" "$commands" >>"$new_commands" || true; }

# provenance WHAT: the commit WHAT's binaries were built from, and what was uncommitted then.
provenance() {
    local head dirty
    head=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{print $2}' | tr '\n' ' ' || true)
    echo "# $1 built from commit $head${dirty:+, uncommitted changes in: ${dirty% }}"
}

run - cargo build --release --workspace --locked
# The simulator with whole-program optimisation (Cargo.toml's `sim` profile).
run - cargo build --profile sim -p swarm-simulations --locked

status=0
if [[ ${SKIP_EMULATION:-} == 1 ]]; then
    keep "# emulation built from"
    keep "emulate.py"
else
    provenance emulation >>"$new_commands"
    [[ $(id -u) == 0 ]] || { echo "the emulation needs root (or SKIP_EMULATION=1)" >&2; exit 1; }
    # shellcheck disable=SC2086 # EMULATE_ARGS is a list of words on purpose
    run - /usr/bin/python3 simulations/emulate/emulate.py run --scenario edge,incluster,churn,edge-containerd \
        --systems direct,swarm,libtorrent --swarm-bin target/release/swarm ${EMULATE_ARGS:-} \
        --json "$results/emulate.json" || status=$?
    # emulate.py exits 1 when a system failed; the report shows which and why.
    [[ -f $results/emulate.json ]] || { echo "emulate.py wrote no JSON (exit $status)" >&2; exit 1; }
fi

sims=()
if [[ ${SKIP_SIM:-} == 1 ]]; then
    keep "# simulator built from"
    keep "swarm-sim --"
    for f in "$results"/sim-*.json; do [[ -f $f ]] && sims+=(--sim "$f"); done
else
    rm -f "$results"/sim-*.json
    provenance simulator >>"$new_commands"
    runs=()
    for n in $sim_nodes; do runs+=("edge $n" "in-cluster $n"); done
    for n in $sim_large; do runs+=("edge $n"); done
    for r in "${runs[@]}"; do
        read -r scenario n <<<"$r"
        out="$results/sim-$scenario-$n.json"
        run "$out" target/sim/swarm-sim --scenario "$scenario" -n "$n" --blob "$sim_blob" \
            --node-up-spread "$sim_spread" --json
        sims+=(--sim "$out")
    done
    # Faults on the first size: the lease holder crashes at 30 s; the tracker is away
    # from 30 s for 20 s.
    for n in ${sim_nodes%% *}; do
        for fault in "kill-holder --kill-holder-at 30s" "tracker-down --tracker-down-at 30s --tracker-down-for 20s"; do
            read -r name flags <<<"$fault"
            out="$results/sim-edge-$name-$n.json"
            # shellcheck disable=SC2086 # flags is a list of words on purpose
            run "$out" target/sim/swarm-sim --scenario edge -n "$n" --blob "$sim_blob" \
                --node-up-spread "$sim_spread" $flags --json
            sims+=(--sim "$out")
        done
    done
fi
chmod 644 "$new_commands"
mv "$new_commands" "$commands"
trap - EXIT

# The report prints its own command line; it is not in commands.sh.
report=(target/release/swarm-report --emu "$results/emulate.json" "${sims[@]}" --commands-file "$commands"
    --out docs/benchmarks.md --svg docs/benchmarks-completion.svg)
echo "+ $(quote "${report[@]}")" >&2
"${report[@]}"
exit "$status"
