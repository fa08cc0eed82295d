//! Fuzz target `www_authenticate`: see [`swarm_peer::fuzzing::www_authenticate`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| swarm_peer::fuzzing::www_authenticate(data));
