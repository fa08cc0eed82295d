//! Fuzz target `metainfo`: see [`swarm_proto::fuzzing::metainfo`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::metainfo(data));
