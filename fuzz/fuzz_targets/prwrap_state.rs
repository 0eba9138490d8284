//! The reservation state file decoder of `disk_prwrap`, on arbitrary bytes and on arbitrary
//! payloads sealed with a correct header and checksum (so that the payload rules are
//! reached, not only the checksum).
//!
//! Oracle: decoding never panics and allocates no more than the input justifies (libFuzzer's
//! `-rss_limit_mb` and `-malloc_limit_mb` catch a length field trusted blindly); whatever
//! decodes re-encodes to a file that decodes to the same state, and that file is canonical:
//! a persistent state re-encodes to exactly the bytes it came from, and encoding again
//! gives the same bytes.

#![no_main]

use disk_prwrap::state_file_codec::decode;
use libfuzzer_sys::fuzz_target;

/// Wraps `payload` as the writer does: magic, version 1, payload length, CRC-32.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"PRWRAPST".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    let checksum = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        seal(rest)
    };
    let Ok(state) = decode(&bytes) else { return };
    let encoded = state.encode();
    let again =
        decode(&encoded).unwrap_or_else(|e| panic!("the re-encoded file does not decode: {e}"));
    assert_eq!(again, state, "decode -> encode -> decode changed the state");
    assert_eq!(again.encode(), encoded, "encoding is not stable");
    if state.persists() {
        assert_eq!(
            encoded, bytes,
            "a persistent state re-encodes to other bytes"
        );
    }
});
