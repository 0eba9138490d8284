//! `diskctl` as a process: the default main job, specs, JSON output, verification catching
//! corruption in the backing file, and bad input as one line with a non-zero exit.

use std::process::{Command, Output};

fn diskctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let output = diskctl(args);
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    stdout(&output)
}

/// Asserts `args` fail with one line that contains `fragment`, and no panic.
#[track_caller]
fn fails(args: &[&str], fragment: &str) {
    let output = diskctl(args);
    let err = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?} exit code; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line expected: {err}"
    );
    assert!(
        err.contains(fragment),
        "{args:?}: expected `{fragment}` in: {err}"
    );
}

fn image(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(len).unwrap();
    file
}

#[test]
fn bench_default_runs_and_reports() {
    let out = ok(&["bench", "--runtime", "0.5"]);
    assert!(
        out.contains("IOPS") && out.contains("MiB/s") && out.contains("reads checked"),
        "{out}"
    );
}

#[test]
fn bench_json_schema() {
    let out = ok(&[
        "bench",
        "ram(size=16M)",
        "--runtime",
        "0.2",
        "--bs",
        "64k",
        "--qd",
        "4",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["disk", "workload", "result"] {
        assert!(json.get(key).is_some(), "missing {key}: {out}");
    }
    let result = &json["result"];
    for key in [
        "elapsed_seconds",
        "reads",
        "writes",
        "read_bytes",
        "write_bytes",
        "iops",
        "bandwidth_bytes_per_second",
        "verified_reads",
        "unverified_reads",
    ] {
        assert!(result[key].is_number(), "result.{key}: {out}");
    }
    for key in ["mean", "p50", "p99", "p999"] {
        assert!(
            result["latency_us"][key].is_number(),
            "latency_us.{key}: {out}"
        );
    }
    assert_eq!(json["workload"]["rw"], "randrw");
    assert_eq!(json["workload"]["block_size"], 65536);
    assert_eq!(json["disk"]["sector_count"], 32768);
    assert_eq!(json["disk"]["spec"], "ram(size=16M)");
}

#[test]
fn verify_catches_corruption_in_the_backing_file() {
    use std::os::unix::fs::FileExt;
    let file = image(4 << 20);
    let spec = format!("file({})", file.path().display());
    let size = (4u64 << 20).to_string();
    // Fill every block, then read everything back: all verified.
    ok(&[
        "bench", &spec, "--rw", "write", "--size", &size, "--qd", "4",
    ]);
    let out = ok(&[
        "bench", &spec, "--rw", "read", "--size", &size, "--qd", "4", "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["result"]["verified_reads"], 1024, "{out}");
    // Flip one byte in the middle of block 700 behind the disk's back.
    let offset = 700 * 4096 + 2000;
    let mut byte = [0u8];
    file.as_file().read_exact_at(&mut byte, offset).unwrap();
    file.as_file()
        .write_all_at(&[byte[0] ^ 0x40], offset)
        .unwrap();
    fails(
        &["bench", &spec, "--rw", "read", "--size", &size, "--qd", "4"],
        "data mismatch: block 700 (byte offset 2867200): checksum mismatch",
    );
}

#[test]
fn info_reports_geometry_and_tree() {
    let base = image(8 << 20);
    let spec = format!(
        "layered(layer(ram, read_cache, write_through), file({}))",
        base.path().display()
    );
    let out = ok(&["info", &spec]);
    assert!(out.contains("16384 sectors of 512 bytes"), "{out}");
    assert!(out.contains("layer ram read_cache write_through"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "info",
        "prwrap(ram(size=1M, sector_size=4096))",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["sector_size"], 4096);
    assert_eq!(json["sector_count"], 256);
    assert_eq!(json["persistent_reservations"], true);
    assert_eq!(json["unmap_behavior"], "zeroes");
    let ro = ok(&["info", &format!("file({}, ro)", base.path().display())]);
    assert!(ro.contains("read-only:            yes"), "{ro}");
    assert!(ok(&["kinds"]).contains("layered"));
}

#[test]
fn bad_input_is_one_line_and_fails() {
    fails(
        &["info", "floppy(a.img)"],
        "floppy: unknown disk kind `floppy` (known: blockdev, crypt, delay, file, layered, prwrap, qcow2, ram, striped)",
    );
    fails(
        &["info", "layered(ram, file:x"],
        "malformed disk spec at column 20",
    );
    fails(
        &["info", "file:/nonexistent/disk.img"],
        "file: cannot open the file: cannot open /nonexistent/disk.img",
    );
    fails(
        &["info", "layered(ram, file:/nonexistent)"],
        "layered/file[2]: cannot open the file",
    );
    fails(&["info", "file(/sys/kernel/notes)"], "Permission denied");
    fails(
        &["info", "ram(size=1000)"],
        "ram: size 1000 is not a positive multiple of the 512-byte sector size",
    );
    fails(
        &["info", "ram(sector_size=1000)"],
        "invalid sector size 1000",
    );
    fails(
        &["info", "ram(size=12q)"],
        "`size`: unknown size suffix `q`",
    );
    fails(
        &["info", "ram(colour=red)"],
        "ram: unknown argument `colour`",
    );
    fails(
        &["info", "layered()"],
        "layered: invalid layer stack: a layered disk needs at least one layer",
    );
    fails(
        &["info", "layered(ram)"],
        "layered: invalid layer stack: layer 0 could not be attached: a RAM layer without a size",
    );
    fails(
        &[
            "info",
            "layered(ram(size=1M), ram(size=1M, sector_size=4096))",
        ],
        "sectors but the top layer has 512",
    );
    fails(
        &["info", "prwrap(ram, ram)"],
        "prwrap: takes exactly one disk, not 2",
    );
    fails(
        &["bench", "ram(size=1M)", "--bs", "1000"],
        "block size 1000",
    );
    fails(
        &["bench", "ram(size=64k)", "--qd", "64"],
        "too few for queue depth 64",
    );
    fails(
        &[
            "bench",
            "layered(ram(size=1M), ram(size=1M), ro)",
            "--rw",
            "write",
        ],
        "read-only",
    );
    fails(&["bench", "--runtime=-1"], "runtime must be positive");
    fails(&["bench", "--runtime=0"], "runtime must be positive");
    for args in [
        &["bench", "--size", "12q"][..],
        &["bench", "--read-pct", "101"],
        &["bench", "--rw", "sideways"],
    ] {
        let output = diskctl(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: clap usage errors exit with 2"
        );
        assert!(!stderr(&output).contains("panicked"));
    }
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::process::Stdio;
    for args in [
        &["kinds"][..],
        &["info", "ram", "--json"],
        &["bench", "ram(size=8M)", "--runtime", "0.1"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_diskctl"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before diskctl writes anything.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let err = stderr(&output);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(output.status.success(), "{args:?}: {err}");
    }
}

#[test]
fn crypt_over_striped_and_delay() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("disk.key");
    std::fs::write(&key, (0u8..64).collect::<Vec<u8>>()).unwrap();
    let spec = format!(
        "crypt(striped(ram(size=1M), ram(size=1M), chunk=64k), key=@{})",
        key.display()
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&["info", &spec, "--json"])).unwrap();
    assert_eq!(json["sector_count"], 4096);
    assert_eq!(
        json["unmap_behavior"], "unspecified",
        "zeroes decrypt to noise"
    );
    ok(&["bench", &spec, "--runtime", "0.2", "--qd", "4"]);
    ok(&[
        "bench",
        "delay(ram(size=1M), ms=1)",
        "--runtime",
        "0.1",
        "--qd",
        "2",
    ]);

    let short = dir.path().join("short.key");
    std::fs::write(&short, [1u8; 32]).unwrap();
    fails(
        &["info", &format!("crypt(ram, key=@{})", short.display())],
        "holds 32 bytes; XTS-AES-256 needs exactly 64",
    );
    fails(
        &["info", &format!("crypt(ram, key=hex:{})", "ab".repeat(64))],
        "crypt: invalid key",
    );
    fails(
        &["info", "crypt(ram, key=hex:12)"],
        "a hex key is 128 hex digits",
    );
    fails(
        &["info", "crypt(ram, key=secret)"],
        "`key` must be `@KEYFILE` or `hex:HEX`",
    );
    fails(&["info", "crypt(ram)"], "crypt: missing `key`");
    fails(
        &["info", "striped(ram(size=1M), ram(size=2M))"],
        "striped: invalid stripe set",
    );
    fails(
        &["info", "striped(ram, ram, chunk=1000)"],
        "striped: invalid stripe set",
    );
    fails(&["info", "delay(ram, ms=x)"], "`ms`: `x` is not a number");
    fails(
        &[
            "info",
            &format!(
                "crypt(striped(ram, file:/nonexistent), key=@{})",
                key.display()
            ),
        ],
        "crypt/striped[1]/file[2]: cannot open the file",
    );
}

#[test]
fn serve_bad_input_is_one_line_and_fails() {
    let img = image(1 << 20);
    let path = img.path().to_str().unwrap();
    let spec = format!("file:{path}");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let socket = socket.to_str().unwrap();
    fails(
        &["serve", "--vhost-user", "/nonexistent/dir/blk.sock", &spec],
        "cannot listen on /nonexistent/dir/blk.sock",
    );
    fails(
        &["serve", "--vhost-user", socket, &spec, "--queues", "0"],
        "at least one queue",
    );
    fails(
        &[
            "serve",
            "--vhost-user",
            socket,
            &spec,
            "--queue-size",
            "100",
        ],
        "queue size 100",
    );
    // A regular file in the way is not replaced.
    fails(&["serve", "--vhost-user", path, &spec], "is not a socket");
    fails(
        &["serve", "--vhost-user", socket, "file:/nonexistent.img"],
        "cannot open",
    );
    let usage = diskctl(&["serve", &spec]);
    assert_eq!(usage.status.code(), Some(2), "--vhost-user is required");
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let img = image(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskctl"))
        .args(["serve", "--vhost-user", socket.to_str().unwrap()])
        .arg(format!("file:{}", img.path().display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("serving file("), "{first}");
    assert!(socket.exists());
    // A frontend that connects and goes away does not end the server.
    drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "diskctl: frontend connected"
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "diskctl: frontend disconnected"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status}: {rest:?}");
    assert_eq!(rest, ["diskctl: stopped, disk flushed"]);
    assert!(!socket.exists(), "the socket is removed");
}

/// Paths and specs that used to hang, read without bound or echo megabytes: each is one line
/// and exit 1 (under a watchdog, so a regression fails instead of hanging the run).
#[test]
fn hostile_paths_and_specs_are_one_line() {
    use disk_conformance::host::{make_fifo, without_hanging};
    let dir = tempfile::tempdir().unwrap();
    let fifo = make_fifo(dir.path(), "fifo").display().to_string();
    let long_kind = "k".repeat(100_000);
    let cases: Vec<(String, String)> = vec![
        (format!("file:{fifo}"), format!("{fifo} is a fifo")),
        (format!("file({fifo}, ro)"), format!("{fifo} is a fifo")),
        (format!("blockdev({fifo})"), format!("{fifo} is a fifo")),
        (
            "blockdev(/dev/null)".into(),
            "/dev/null is a character device".into(),
        ),
        (
            format!("prwrap(ram, state={fifo})"),
            format!("{fifo} is a fifo"),
        ),
        (
            format!("crypt(ram, key=@{fifo})"),
            format!("{fifo} is a fifo"),
        ),
        (
            "crypt(ram, key=@/dev/zero)".into(),
            "/dev/zero is a character device".into(),
        ),
        (
            "prwrap(ram, state=/nonexistent/dir/x)".into(),
            "cannot be written".into(),
        ),
        (
            "ram(size=1M, size=2M)".into(),
            "duplicate argument `size`".into(),
        ),
        (long_kind, format!("{}…", "k".repeat(64))),
    ];
    for (spec, fragment) in cases {
        without_hanging(&spec.clone(), move || {
            fails(&["info", &spec], &fragment);
            let output = diskctl(&["info", &spec]);
            assert!(output.stderr.len() < 1000, "{} bytes", output.stderr.len());
        });
    }
}

/// qcow2 images from `qemu-img`: `info` reports the backing file a header names, and an image
/// that names one is refused alone (its layers below must come from the spec). Skips, saying
/// so, without qemu-img, except under `CI=true`.
#[test]
fn qcow2_backing_file_is_reported_never_followed() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "qemu-img is missing under CI=true (install qemu-utils)"
        );
        eprintln!("skipping: qemu-img not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    for args in [
        vec!["create", "-f", "qcow2", b, "16M"],
        vec!["create", "-f", "qcow2", "-b", b, "-F", "qcow2", t],
    ] {
        assert!(
            Command::new("qemu-img")
                .args(&args)
                .status()
                .unwrap()
                .success()
        );
    }
    let out = ok(&[
        "info",
        &format!("layered(qcow2(\"{t}\"), qcow2(\"{b}\", ro))"),
    ]);
    assert!(out.contains("32768 sectors of 512 bytes"), "{out}");
    assert!(
        out.contains(&format!("names backing file {b} (not followed)")),
        "{out}"
    );
    fails(
        &["info", &format!("qcow2(\"{t}\")")],
        &format!("the image names the backing file `{b}` but no layer is given below it"),
    );
    assert!(ok(&["kinds"]).contains("qcow2(PATH, [ro], [cache=BYTES], [direct])"));
}
