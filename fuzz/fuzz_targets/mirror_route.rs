//! Fuzz target `mirror_route`: see [`swarm_peer::fuzzing::mirror_route`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_peer::fuzzing::mirror_route(data));
