//! Fuzz target `range`: see [`swarm_peer::fuzzing::range`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_peer::fuzzing::range(data));
