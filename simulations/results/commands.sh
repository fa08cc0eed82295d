cargo build --release --workspace --locked
# built from commit d5d301755337
# built from commit 007d554eae37
/usr/bin/python3 simulations/emulate/emulate.py run --scenario edge,incluster,churn --systems direct,swarm,libtorrent --swarm-bin target/release/swarm --json simulations/results/emulate.json
target/release/swarm-sim --scenario edge -n 1000 --blob 1GiB --json > simulations/results/sim-edge-1000.json
target/release/swarm-sim --scenario in-cluster -n 1000 --blob 1GiB --json > simulations/results/sim-in-cluster-1000.json
