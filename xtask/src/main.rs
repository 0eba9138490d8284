//! `cargo xtask <verb>`: the one entry point for every routine the README or CI runs.
//!
//! Run `cargo xtask help` for the verbs.

#![forbid(unsafe_code)]

mod bench_qcow2;
mod guest;

use std::process::{Command, ExitCode};

const HELP: &str = "\
usage: cargo xtask <verb> [args]

verbs:
  fmt                 check formatting (cargo fmt --check)
  clippy              lint every target; warnings are errors
  test                run every test, doc tests included; prints the skipped tests
                      and why at the end (docs/testing.md, Skips)
  doc                 build the docs; warnings are errors
  ci                  fmt, clippy, test, doc, fuzz smoke, in that order; stops at the
                      first failure (the fuzz smoke is skipped, saying so, without
                      nightly and cargo-fuzz); ends with the count of skipped tests and
                      their reasons. With CI=true a test that would skip for lack of
                      root, loop devices, io_uring, qemu-img or openssl fails instead
  stress [SEEDS]      the conformance model tests and the concurrency consistency tests
                      over SEEDS random seeds (default 200), release build; set
                      DISK_CONFORMANCE_SEED=N to replay one seed
  bench [NAME]        criterion benchmarks (all, or the bench target NAME)
  bench blockdevice [ARGS]
                      disk_blockdevice against fio on loop devices it creates (root;
                      installs fio if missing); ARGS: --runtime SECS, --reps N,
                      --size-mib MIB, --only shm|disk, --engine TEXT, --workload
                      TEXT, --pin CPU
  bench qcow2 [--rounds N]
                      our qcow2 layer (diskctl bench on qcow2(IMAGE, direct)) against
                      qemu-img bench -t none -i io_uring on the same 1 GiB images in
                      /dev/shm, and against the raw file: allocated 4k reads QD1/QD32,
                      allocating 4k writes QD32, 1M sequential writes QD4; alternated
                      rounds (default 3), medians and ratios
  bench guest [--runtime SECS] [--rounds N] [--spec SPEC] [--qsd-iothread]
                      the same User-Mode Linux guest and fio jobs against
                      qemu-storage-daemon and diskctl serve on one backing file in
                      /dev/shm, alternated (default 10 s, 3 rounds: about 4 minutes),
                      medians and ratios; SPEC names the file IMAGE (default file:IMAGE);
                      --qsd-iothread gives qemu-storage-daemon a polling I/O thread
  fuzz [TARGET [SECS]]
                      list the fuzz targets, or fuzz TARGET for SECS seconds (default
                      300) with cargo-fuzz on the nightly toolchain
  guest-test [--export diskctl|qsd] [--frontend uml|qemu|all] [--case NAME]
                      boot real Linux guests (User-Mode Linux, a QEMU microvm) against a
                      vhost-user-blk export and check the disk from inside (installs the
                      Debian packages it needs when root): diskctl serve on several stacks
                      (default; a qcow2 overlay is checked with qemu-img check after),
                      or qemu-storage-daemon, the reference; --case runs one stack
  run [ARGS]          the main job: diskctl bench on a built-in default
  help                this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (verb, rest) = match args.split_first() {
        Some((verb, rest)) => (verb.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match verb {
        "fmt" => fmt(),
        "clippy" => clippy(),
        "test" => test(),
        "doc" => doc(),
        "ci" => ci(),
        "stress" => stress(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "guest-test" => guest::guest_test(rest),
        "run" => run_main_job(rest),
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown verb `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

type Result = std::result::Result<(), String>;

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(step: &str, mut command: Command) -> Result {
    eprintln!("xtask: {step}: {command:?}");
    let status = command
        .status()
        .map_err(|e| format!("{step}: could not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn fmt() -> Result {
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run("fmt", c)
}

fn clippy() -> Result {
    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", c)
}

fn test() -> Result {
    let result = run_tests();
    print_skips();
    result
}

/// Every test, recording skips in [`skip_log`] (emptied first).
fn run_tests() -> Result {
    let log = skip_log();
    match std::fs::remove_file(&log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot empty {}: {e}", log.display()));
        }
        _ => {}
    }
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut c = cargo();
    c.args(["test", "--workspace", "--all-targets", "--locked"]);
    c.env(test_skip::SKIP_LOG_ENV, &log);
    run("test", c)?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--doc", "--locked"]);
    c.env(test_skip::SKIP_LOG_ENV, &log);
    run("doc tests", c)
}

/// The file tests append their skips to (`test_skip`): `skipped-tests.log` in the target
/// directory, as an absolute path since each test runs in its crate's directory.
fn skip_log() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from("target"),
        std::path::PathBuf::from,
    );
    let target = if target.is_absolute() {
        target
    } else {
        std::env::current_dir().unwrap_or_default().join(target)
    };
    target.join("skipped-tests.log")
}

/// Prints how many tests skipped and why, from [`skip_log`].
fn print_skips() {
    let text = std::fs::read_to_string(skip_log()).unwrap_or_default();
    eprint!("{}", skip_summary(&text));
}

/// The summary of a skip log (`TEST<TAB>REASON` lines): the count, then each reason with
/// how many tests it skipped and the first few of them.
fn skip_summary(log: &str) -> String {
    let mut reasons: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    let mut count = 0;
    for line in log.lines().filter(|l| !l.is_empty()) {
        let (test, reason) = line.split_once('\t').unwrap_or(("?", line));
        reasons.entry(reason).or_default().push(test);
        count += 1;
    }
    if count == 0 {
        return "xtask: no test skipped\n".into();
    }
    let mut out = format!("xtask: {count} skipped (tests or parts of tests), by reason:\n");
    for (reason, tests) in &reasons {
        let shown: Vec<&str> = tests.iter().take(3).copied().collect();
        let more = if tests.len() > 3 { ", ..." } else { "" };
        out += &format!(
            "  {:>4}  {reason}\n        ({}{more})\n",
            tests.len(),
            shown.join(", ")
        );
    }
    out
}

fn doc() -> Result {
    let mut c = cargo();
    c.args(["doc", "--workspace", "--no-deps", "--locked"]);
    c.env("RUSTDOCFLAGS", "-D warnings");
    run("doc", c)
}

fn ci() -> Result {
    fmt()?;
    clippy()?;
    let tested = run_tests().and_then(|()| doc()).and_then(|()| fuzz_smoke());
    // The skips are worth seeing whether or not a later step failed.
    print_skips();
    tested?;
    eprintln!("xtask: ci passed");
    Ok(())
}

/// Seconds each fuzz target runs in `ci`: enough to catch a crash on a shallow path, short
/// enough for CI. Long runs are `cargo xtask fuzz TARGET SECS`.
const SMOKE_SECONDS: u32 = 20;

fn fuzz_targets() -> std::result::Result<Vec<String>, String> {
    let dir = std::path::Path::new("fuzz/fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    targets.sort();
    Ok(targets)
}

fn fuzz_available() -> bool {
    Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn fuzz_run(target: &str, seconds: u32) -> Result {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz", "run", target, "--"]);
    c.arg(format!("-max_total_time={seconds}"));
    run(&format!("fuzz {target}"), c)
}

fn fuzz(args: &[String]) -> Result {
    let targets = fuzz_targets()?;
    let (target, seconds) = match args {
        [] => {
            println!("{}", targets.join("\n"));
            return Ok(());
        }
        [target] => (target, 300),
        [target, seconds] => (
            target,
            seconds
                .parse()
                .map_err(|_| format!("`{seconds}` is not a number of seconds"))?,
        ),
        _ => return Err("usage: cargo xtask fuzz [TARGET [SECONDS]]".into()),
    };
    if !targets.contains(target) {
        return Err(format!(
            "no fuzz target `{target}`; targets: {}",
            targets.join(", ")
        ));
    }
    if !fuzz_available() {
        return Err(
            "fuzzing needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`)"
                .into(),
        );
    }
    fuzz_run(target, seconds)
}

fn fuzz_smoke() -> Result {
    if !fuzz_available() {
        let reason =
            "fuzz smoke: needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`)";
        eprintln!("xtask: fuzz smoke SKIPPED: {reason}");
        // Counted with the tests' skips at the end of `ci`.
        let record = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(skip_log())
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, format!("xtask fuzz\t{reason}\n").as_bytes())
            });
        if let Err(e) = record {
            eprintln!("xtask: cannot record the skip: {e}");
        }
        return Ok(());
    }
    for target in fuzz_targets()? {
        fuzz_run(&target, SMOKE_SECONDS)?;
    }
    Ok(())
}

fn stress(args: &[String]) -> Result {
    let seeds = match args {
        [] => "200".to_string(),
        [n] if n.parse::<u64>().is_ok() => n.clone(),
        _ => return Err("usage: cargo xtask stress [SEEDS]".into()),
    };
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--release",
        "--locked",
        "--",
        "conformance",
        "consistency",
    ]);
    c.env("DISK_CONFORMANCE_SEEDS", seeds);
    run("stress", c)
}

fn bench(args: &[String]) -> Result {
    match args {
        [name, rest @ ..] if name == "blockdevice" => return bench_blockdevice(rest),
        [name, rest @ ..] if name == "guest" => return guest::bench_guest(rest),
        [name, rest @ ..] if name == "qcow2" => return bench_qcow2::bench_qcow2(rest),
        _ => {}
    }
    let mut c = cargo();
    c.args(["bench", "--workspace", "--locked"]);
    if let [name] = args {
        c.args(["--bench", name]);
    } else if !args.is_empty() {
        return Err("usage: cargo xtask bench [NAME]".into());
    }
    run("bench", c)
}

/// The fio comparison of `disk_blockdevice`: an example binary, since it needs root, loop
/// devices and fio rather than criterion's harness.
fn bench_blockdevice(args: &[String]) -> Result {
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "--locked",
        "-p",
        "disk_blockdevice",
        "--example",
        "fio_compare",
        "--",
    ]);
    c.args(args);
    run("bench blockdevice", c)
}

fn run_main_job(args: &[String]) -> Result {
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "--locked",
        "-p",
        "diskctl",
        "--",
        "bench",
    ]);
    c.args(args);
    run("run", c)
}

#[cfg(test)]
mod tests {
    use super::skip_summary;

    #[test]
    fn skips_are_counted_by_reason() {
        assert_eq!(skip_summary(""), "xtask: no test skipped\n");
        let log = "a::one\tloop devices need root\n\
                   a::two\tloop devices need root\n\
                   b::three\tno huge pages\n";
        let summary = skip_summary(log);
        assert!(summary.starts_with("xtask: 3 skipped"), "{summary}");
        assert!(
            summary.contains("     2  loop devices need root\n        (a::one, a::two)"),
            "{summary}"
        );
        assert!(summary.contains("     1  no huge pages"), "{summary}");
    }
}
