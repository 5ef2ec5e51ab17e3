//! Entry points for the fuzz targets in `tests/fuzz` (feature `fuzzing`,
//! never in a release build). Each takes untrusted bytes as they would
//! arrive and checks what must hold for any input: no panic, bounds kept,
//! and what is accepted means what it says.

/// The agent link's frame codec (`docs/protocol.md` section 1).
pub fn frame_codec(data: &[u8]) {
    crate::protocol::codec::fuzz_decode(data);
}

/// A browser's text message on the console WebSocket (section 2).
pub fn client_message(data: &[u8]) {
    crate::server::ws::fuzz_client_message(data);
}

/// A REST request: the exec body's JSON, and the file endpoints' query.
/// The first byte picks which, so one corpus grows both.
pub fn rest_request(data: &[u8]) {
    match data.split_first() {
        Some((b'?', query)) => crate::server::files::fuzz_query(query),
        _ => crate::server::api::fuzz_exec_body(data),
    }
}
