//! Fuzz target `peer_message`: see [`swarm_proto::fuzzing::peer_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::peer_message(data));
