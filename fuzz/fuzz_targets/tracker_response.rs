//! Fuzz target `tracker_response`: see [`swarm_proto::fuzzing::tracker_response`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_proto::fuzzing::tracker_response(data));
