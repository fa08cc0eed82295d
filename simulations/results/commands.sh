cargo build --release --workspace --locked
cargo build --profile sim -p swarm-simulations --locked
# emulation built from commit ebffe56daea1, uncommitted changes in: docs/architecture.md
/usr/bin/python3 simulations/emulate/emulate.py run --scenario edge,incluster,churn,edge-containerd --systems direct,swarm,libtorrent --swarm-bin target/release/swarm --json simulations/results/emulate.json
# simulator built from commit b418df3b3590
target/sim/swarm-sim --scenario edge -n 1000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-edge-1000.json
target/sim/swarm-sim --scenario in-cluster -n 1000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-in-cluster-1000.json
target/sim/swarm-sim --scenario edge -n 10000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-edge-10000.json
target/sim/swarm-sim --scenario edge -n 1000 --blob 1GiB --node-up-spread 0.5 --kill-holder-at 30s --json > simulations/results/sim-edge-kill-holder-1000.json
target/sim/swarm-sim --scenario edge -n 1000 --blob 1GiB --node-up-spread 0.5 --tracker-down-at 30s --tracker-down-for 20s --json > simulations/results/sim-edge-tracker-down-1000.json
