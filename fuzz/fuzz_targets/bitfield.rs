//! Fuzz target `bitfield`: see [`swarm_proto::fuzzing::bitfield`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::bitfield(data));
