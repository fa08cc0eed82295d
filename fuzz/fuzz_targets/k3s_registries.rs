//! Fuzz target `k3s_registries`: see [`swarm_peer::fuzzing::k3s_registries`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_peer::fuzzing::k3s_registries(data));
