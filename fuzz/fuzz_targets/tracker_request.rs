//! Fuzz target `tracker_request`: see [`swarm_proto::fuzzing::tracker_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::tracker_request(data));
