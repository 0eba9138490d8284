//! `diskctl` as a process: the default main job, and errors as one line with a non-zero exit.

use std::process::Command;

fn diskctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskctl"))
}

#[test]
fn bench_default_runs_and_reports() {
    let output = diskctl()
        .args(["bench", "--seconds", "0.5", "--size", "16M"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("IOPS"), "{stdout}");
    assert!(stdout.contains("MiB/s"), "{stdout}");
    assert!(stdout.contains("no mismatches"), "{stdout}");
}

#[test]
fn bench_on_ram() {
    let output = diskctl()
        .args([
            "bench",
            "--backend",
            "ram",
            "--seconds",
            "0.2",
            "--bs",
            "64k",
            "--qd",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bad_input_is_one_line_and_fails() {
    for args in [
        &["bench", "--file", "/nonexistent/disk.img"][..],
        &["bench", "--bs", "1000"],
        &["bench", "--sector-size", "1000", "--backend", "ram"],
        &["bench", "--size", "12q"],
        &["bench", "--read-pct", "101"],
        &["bench", "--seconds", "-1"],
    ] {
        let output = diskctl().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: no message");
    }
}
