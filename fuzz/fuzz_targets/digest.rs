//! Fuzz target `digest`: see [`swarm_proto::fuzzing::digest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::digest(data));
