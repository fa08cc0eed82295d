//! Fuzz target `names`: see [`swarm_peer::fuzzing::names`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_peer::fuzzing::names(data));
