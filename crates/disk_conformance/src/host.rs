//! Helpers for tests that feed the stack hostile host files: FIFOs, device nodes, paths
//! that hang a careless `open`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long [`without_hanging`] waits before it calls the work hung: far beyond what any
/// check here takes on a loaded machine, so it only ever fires on a real hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Runs `work` on a thread of its own and returns its result, or panics saying `what` hangs
/// if it has not finished after [`HANG_LIMIT`]. For checks whose failure mode is a hang (an
/// `open` of a FIFO that waits for a writer), so that a regression fails the test instead of
/// hanging the run. The hung thread is left behind; the test process ends with the test.
pub fn without_hanging<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(HANG_LIMIT) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} hangs"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Creates a FIFO named `name` in `dir` (nobody ever opens its other end).
pub fn make_fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
    path
}

/// Checks that `error`, what resolving `spec` gave, is one line that contains `fragment`
/// (the path and what is wrong with it, say).
#[track_caller]
pub fn assert_one_line_error(spec: &str, error: &str, fragment: &str) {
    assert!(!error.contains('\n'), "{spec}: {error}");
    assert!(error.contains(fragment), "{spec}: {error}");
}

/// `error` and its sources, joined with `: `, as a command line prints them.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
