cargo build --release --workspace --locked
# built from commit ebffe56daea1, uncommitted changes in: docs/architecture.md
/usr/bin/python3 simulations/emulate/emulate.py run --scenario edge,incluster,churn,edge-containerd --systems direct,swarm,libtorrent --swarm-bin target/release/swarm --json simulations/results/emulate.json
target/release/swarm-sim --scenario edge -n 1000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-edge-1000.json
target/release/swarm-sim --scenario in-cluster -n 1000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-in-cluster-1000.json
target/release/swarm-sim --scenario edge -n 10000 --blob 1GiB --node-up-spread 0.5 --json > simulations/results/sim-edge-10000.json
