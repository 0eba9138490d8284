//! Skipping a test visibly: every test that cannot run here says why, in one recognisable
//! line, leaves a record `cargo xtask ci` counts, and fails instead under `CI=true` when the
//! CI machines are known to have what it needs.
//!
//! A skipped test still passes (Rust's test harness has no "skipped" outcome), so a skip is
//! easy to miss: a test that needs root passes as root and as a user alike. Hence:
//!
//! - [`skip`] for what the CI machines have (root, loop devices, io_uring and its kernel
//!   features, `qemu-img`, `openssl`): with the environment variable `CI` set to `true` it
//!   panics, so a CI run that silently stopped testing something fails;
//! - [`skip_optional`] for what even CI may lack (transparent huge pages, a tmpfs at
//!   `/dev/shm`, a file system that punches holes): never fails;
//! - both print `skipping: REASON` to standard error and, when the environment variable
//!   [`SKIP_LOG_ENV`] names a file, append `TEST<TAB>REASON` to it (one `write` of an
//!   `O_APPEND` file per record, so parallel tests do not interleave). `cargo xtask test` and
//!   `ci` set it and print the count and the reasons at the end.
//!
//! The caller returns after the call (these functions cannot return for it):
//!
//! ```
//! fn loop_devices_unavailable() -> Option<String> {
//!     # return None;
//!     (!is_root()).then(|| "loop devices need root".into())
//! }
//! # fn is_root() -> bool { true }
//! if let Some(reason) = loop_devices_unavailable() {
//!     test_skip::skip(reason);
//!     return;
//! }
//! ```
//!
//! This crate has no dependencies, so that any crate's tests can use it (`guestmem`'s too);
//! `disk_conformance` re-exports it as `disk_conformance::skip`.

#![forbid(unsafe_code)]

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

/// The environment variable naming the file skip records are appended to.
pub const SKIP_LOG_ENV: &str = "DISK_TEST_SKIP_LOG";

/// Whether this run is CI (`CI=true`, as GitHub Actions and most CI systems set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true"))
}

/// Skips the calling test for something CI machines have: fails (panics) under `CI=true`,
/// else prints `skipping: REASON` and records the skip. The caller then returns.
#[track_caller]
pub fn skip(reason: impl Display) {
    let log = std::env::var_os(SKIP_LOG_ENV);
    skip_with(
        in_ci(),
        true,
        log.as_deref().map(Path::new),
        &reason.to_string(),
    );
}

/// Skips the calling test (or a part of it) for something a machine, even a CI one, may
/// lack: prints `skipping: REASON` and records the skip, never fails.
pub fn skip_optional(reason: impl Display) {
    let log = std::env::var_os(SKIP_LOG_ENV);
    skip_with(
        in_ci(),
        false,
        log.as_deref().map(Path::new),
        &reason.to_string(),
    );
}

/// The skip itself, with the environment passed in (so it can be tested without touching
/// the process environment).
#[track_caller]
fn skip_with(ci: bool, required_in_ci: bool, log: Option<&Path>, reason: &str) {
    if ci && required_in_ci {
        panic!("CI=true and this machine should run this test, but it would be skipped: {reason}");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed thread)")
        .to_owned();
    let line = record_line(&test, reason);
    eprint!("skipping: {}", line.split_once('\t').map_or("", |(_, r)| r));
    let Some(path) = log else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", path.display());
    }
}

/// `TEST<TAB>REASON<NEWLINE>`, with tabs and newlines in either made spaces so that a record
/// is one line of two fields.
fn record_line(test: &str, reason: &str) -> String {
    let clean = |text: &str| text.replace(['\n', '\t', '\r'], " ");
    format!("{}\t{}\n", clean(test), clean(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("skip-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{:?}", std::thread::current().id()))
    }

    #[test]
    fn a_skip_appends_one_record() {
        let path = log();
        let _ = std::fs::remove_file(&path);
        skip_with(false, true, Some(&path), "no loop\tdevices\nhere");
        skip_with(true, false, Some(&path), "no huge pages");
        let text = std::fs::read_to_string(&path).unwrap();
        let test = "tests::a_skip_appends_one_record";
        assert_eq!(
            text,
            format!("{test}\tno loop devices here\n{test}\tno huge pages\n")
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    #[should_panic(expected = "CI=true")]
    fn a_required_skip_fails_in_ci() {
        skip_with(true, true, None, "no root");
    }
}
