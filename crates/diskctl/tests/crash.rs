//! The short crash-consistency run CI does (`cargo xtask crash` is the long one): a writer
//! killed with SIGKILL ten times on each persistent stack, every sector checked after each
//! kill; and the control stack, which loses writes, must be reported.

use std::process::{Command, Output};

/// `diskctl crash run` on 1 MiB images, each kill `delay_ms[0]` to `delay_ms[1]` ms after
/// the writer started.
fn crash_run(stacks: &str, iterations: u32, delay_ms: [&str; 2]) -> Output {
    crash_run_with(stacks, iterations, delay_ms, &[])
}

fn crash_run_with(stacks: &str, iterations: u32, delay_ms: [&str; 2], more: &[&str]) -> Output {
    let iterations = iterations.to_string();
    let args = [
        "crash",
        "run",
        "--stacks",
        stacks,
        "--size",
        "1M",
        "--no-keep",
        "--min-delay-ms",
        delay_ms[0],
        "--max-delay-ms",
        delay_ms[1],
        "--iterations",
        &iterations,
    ];
    Command::new(env!("CARGO_BIN_EXE_diskctl"))
        .args(args)
        .args(more)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

#[test]
fn crash_consistency_short_run() {
    let mut stacks = vec!["file", "file-4k", "crypt", "layered"];
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        stacks.push("qcow2");
    } else {
        test_skip::skip("crash consistency on qcow2: qemu-img (qemu-utils) is missing");
    }
    if is_root() {
        stacks.extend(["blockdev", "blockdev-buffered", "file-on-loop"]);
    } else {
        test_skip::skip("crash consistency on blockdev: loop devices need root");
    }
    let output = crash_run(&stacks.join(","), 10, ["0", "100"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for stack in stacks {
        assert!(
            out.contains(&format!("{stack}: 10 iterations, 10 kills, 0 violations")),
            "{out}"
        );
    }
}

/// A RAM layer over a file loses every write at the kill: without this failing, a clean run
/// would prove nothing.
#[test]
fn crash_harness_reports_lost_writes() {
    // At least 100 ms of writing before each kill, so that even on a loaded machine some
    // writes were acknowledged (and lost).
    let output = crash_run("ram-over-file", 3, ["100", "300"]);
    let out = text(&output);
    assert!(!output.status.success(), "{out}");
    assert!(
        out.contains("ram-over-file: 3 iterations, 3 kills"),
        "{out}"
    );
    assert!(!out.contains(" 0 violations"), "{out}");
    assert!(out.contains(" allows only: "), "{out}");
}

/// The defect the long run found (docs/testing.md, Crash consistency): through the page
/// cache, `BLKDISCARD` drops dirty pages before it discards, and a SIGKILL in between lost an
/// acknowledged write in the range (in 0.7% to 2% of kills here) until the disk wrote the
/// range back first. 300 kills miss a 2% defect with a probability of about 0.2%.
#[test]
fn blockdev_buffered_unmap_keeps_acknowledged_writes_across_a_kill() {
    if !is_root() {
        test_skip::skip("crash consistency on blockdev: loop devices need root");
        return;
    }
    let output = crash_run_with("blockdev-buffered", 300, ["0", "300"], &["--process-crash"]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
}
