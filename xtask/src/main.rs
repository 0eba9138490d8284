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
  crash [ARGS]        crash consistency: a writer on each persistent stack (file,
                      blockdev on a loop device as root, crypt, write-through layered)
                      killed with SIGKILL at random moments, every sector checked after
                      each kill against the writer's journal (release build); ARGS:
                      --iterations N (default 20; CI runs 10 per stack as a test),
                      --stacks LIST, --seed N, --min-delay-ms MS, --max-delay-ms MS
                      (a kill's delay after the writer starts, default 0 to 300),
                      --size BYTES, --queue-depth N, --dir DIR (default /dev/shm),
                      --no-keep (drop a failing iteration's files)
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
  bench export [--rounds N] [--seconds S] [--stack file|blockdev-buffered|blockdev]...
               [--job NAME]... [--queues N]...
                      our vhost-user-blk export against qemu-storage-daemon (aio=io_uring
                      and aio=threads) on the same /dev/shm image, driven by libblkio with no
                      VM: 4k random read QD1/16/32, 4k random write QD32, 1M read/write QD4,
                      1 and 2 queues; IOPS, exporter CPU per request, mean latency
  bench guest [--runtime SECS] [--rounds N] [--spec SPEC] [--qsd-iothread]
                      the same User-Mode Linux guest and fio jobs against
                      qemu-storage-daemon and diskctl serve on one backing file in
                      /dev/shm, alternated (default 10 s, 3 rounds: about 4 minutes),
                      medians and ratios; SPEC names the file IMAGE (default file:IMAGE);
                      --qsd-iothread gives qemu-storage-daemon a polling I/O thread
  fuzz [TARGET [SECS]]
                      list the fuzz targets, or fuzz TARGET for SECS seconds (default
                      300) with cargo-fuzz on the nightly toolchain, growing its corpus
                      in fuzz/corpus/TARGET
  fuzz-long [--minutes N]
                      every fuzz target in turn for N minutes (default 10), growing and
                      then minimising (cargo fuzz cmin) its corpus in fuzz/corpus;
                      prints executions, exec/s and executions per CPU second per
                      target; fails on any finding
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
        "crash" => crash(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "fuzz-long" => fuzz_long(rest),
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
/// enough for CI (seven targets). Long runs are `cargo xtask fuzz-long`.
const SMOKE_SECONDS: u32 = 5;

/// Minutes each target runs in `fuzz-long` unless `--minutes` says otherwise.
const LONG_MINUTES: u32 = 10;

/// Targets built without AddressSanitizer. They start threads per input (a device's I/O
/// thread, kick threads) or allocate per request, which ASan slows by 4 to 8 times (from
/// about 7,000 to 900 inputs a second for `virtio_block_request`), and the code they reach
/// beyond what the other targets cover is safe Rust. Every other target keeps ASan.
const UNSANITIZED: &[&str] = &["layered", "vhost_user_messages", "virtio_block_request"];

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

/// `cargo +nightly fuzz SUBCOMMAND` with the target's sanitizer (a separate target
/// directory for the unsanitized build, so the two builds do not replace each other).
fn cargo_fuzz(subcommand: &str, target: &str) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz", subcommand]);
    if UNSANITIZED.contains(&target) {
        c.args([
            "--sanitizer",
            "none",
            "--target-dir",
            "fuzz/target/unsanitized",
        ]);
    }
    c.arg(target);
    c
}

/// The committed corpus of `target`, which every run starts from.
fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new("fuzz/corpus").join(target)
}

/// Runs `target` for `seconds`. New inputs go to `into` (created if missing); the committed
/// corpus seeds the run when `into` is another directory.
fn fuzz_run(target: &str, seconds: u32, into: &std::path::Path) -> Result {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let mut c = cargo_fuzz("run", target);
    c.arg(into);
    let corpus = corpus_dir(target);
    if corpus != into && corpus.is_dir() {
        c.arg(corpus);
    }
    c.args(["--", &format!("-max_total_time={seconds}")]);
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
    fuzz_run(target, seconds, &corpus_dir(target))
}

/// What libFuzzer's last words say about a run.
#[derive(Debug, Default, PartialEq, Eq)]
struct FuzzStats {
    /// Inputs executed (`#N DONE`, or `stat::number_of_executed_units`).
    executions: Option<u64>,
    /// Inputs a second over the run (`exec/s:` of the `DONE` line, or
    /// `stat::average_exec_per_sec`).
    per_second: Option<u64>,
    /// Seconds the run took (`Done N runs in S second(s)`).
    seconds: Option<u64>,
}

/// Reads the final statistics out of libFuzzer's output.
fn fuzz_stats(output: &str) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let number = |text: &str| text.trim().parse::<u64>().ok();
    for line in output.lines() {
        if let Some(value) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = number(value);
        } else if let Some(value) = line.strip_prefix("stat::average_exec_per_sec:") {
            stats.per_second = number(value);
        } else if let Some(rest) = line.strip_prefix('#')
            && let Some((count, rest)) = rest.split_once(char::is_whitespace)
            && rest.trim_start().starts_with("DONE")
        {
            stats.executions = number(count);
            stats.per_second = rest
                .split_once("exec/s:")
                .and_then(|(_, after)| number(after.split_whitespace().next()?));
        } else if let Some(rest) = line.strip_prefix("Done ")
            && let Some((_, seconds)) = rest.split_once(" runs in ")
        {
            stats.seconds = number(seconds.split_whitespace().next().unwrap_or(""));
        }
    }
    stats
}

/// CPU seconds used by this process's waited-for children so far (`cutime` + `cstime` of
/// `/proc/self/stat`, in the kernel's 100 Hz clock ticks), or `None` off Linux. On a machine
/// shared with other builds, executions per CPU second say more about a target than
/// executions per wall-clock second.
fn children_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    // Fields 16 and 17 of proc(5); the first after the `)` is field 3.
    let ticks: u64 = fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// `fuzz-long [--minutes N]`: every target in turn for N minutes, growing and then minimising
/// its committed corpus; a summary line per target; fails if any target failed.
fn fuzz_long(args: &[String]) -> Result {
    let minutes = match args {
        [] => LONG_MINUTES,
        [flag, n] if flag == "--minutes" => n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{n}` is not a number of minutes"))?,
        _ => return Err("usage: cargo xtask fuzz-long [--minutes N]".into()),
    };
    if !fuzz_available() {
        return Err(
            "fuzzing needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`)"
                .into(),
        );
    }
    let logs = std::path::Path::new("fuzz/target/fuzz-long");
    std::fs::create_dir_all(logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for target in fuzz_targets()? {
        let corpus = corpus_dir(&target);
        std::fs::create_dir_all(&corpus)
            .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        let log = logs.join(format!("{target}.log"));
        eprintln!(
            "xtask: fuzz-long: {target} for {minutes} min (output in {})",
            log.display()
        );
        let mut c = cargo_fuzz("run", &target);
        c.arg(&corpus);
        c.args([
            "--",
            &format!("-max_total_time={}", u64::from(minutes) * 60),
            "-print_final_stats=1",
        ]);
        let cpu_before = children_cpu_seconds();
        let output = c
            .output()
            .map_err(|e| format!("fuzz {target}: could not start: {e}"))?;
        let cpu = children_cpu_seconds()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        std::fs::write(&log, &text).map_err(|e| format!("cannot write {}: {e}", log.display()))?;
        let stats = fuzz_stats(&text);
        let per_cpu_second = stats
            .executions
            .zip(cpu.filter(|&s| s > 0.0))
            .map(|(n, s)| (n as f64 / s) as u64);
        let line = format!(
            "{target:<22} {:>11} executions {:>6} exec/s {:>6} per CPU s {:>5} s  {}",
            stats.executions.map_or("?".into(), |n| n.to_string()),
            stats.per_second.map_or("?".into(), |n| n.to_string()),
            per_cpu_second.map_or("?".into(), |n| n.to_string()),
            stats.seconds.map_or("?".into(), |n| n.to_string()),
            if output.status.success() {
                "no finding"
            } else {
                "FAILED"
            },
        );
        eprintln!("xtask: fuzz-long: {line}");
        summary.push(line);
        if !output.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            for l in tail.into_iter().rev() {
                eprintln!("  {l}");
            }
            failed.push(target.clone());
            continue;
        }
        // Keep the committed corpus small: only inputs that add coverage.
        let mut c = cargo_fuzz("cmin", &target);
        c.arg(&corpus);
        c.stdout(std::process::Stdio::null());
        c.stderr(std::process::Stdio::null());
        run(&format!("cmin {target}"), c)?;
    }
    eprintln!("xtask: fuzz-long: {minutes} min per target");
    for line in &summary {
        eprintln!("  {line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz-long: {} failed (inputs in fuzz/artifacts/)",
            failed.join(", ")
        ))
    }
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
    // New inputs go to a scratch directory, so that CI leaves the committed corpus as it is.
    let scratch = std::path::Path::new("fuzz/target/smoke-corpus");
    for target in fuzz_targets()? {
        fuzz_run(&target, SMOKE_SECONDS, &scratch.join(&target))?;
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

/// The crash-consistency harness, `diskctl crash run` (docs/testing.md); the short run is
/// `diskctl`'s test `crash_consistency_short_run`.
fn crash(args: &[String]) -> Result {
    run_release("crash", &["-p", "diskctl", "--", "crash", "run"], args)
}

fn bench(args: &[String]) -> Result {
    match args {
        [name, rest @ ..] if name == "blockdevice" => return bench_blockdevice(rest),
        [name, rest @ ..] if name == "guest" => return guest::bench_guest(rest),
        [name, rest @ ..] if name == "qcow2" => return bench_qcow2::bench_qcow2(rest),
        [name, rest @ ..] if name == "export" => return bench_export(rest),
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

/// Our vhost-user-blk export against qemu-storage-daemon's, from libblkio
/// (`crates/export_bench`); builds the release `diskctl` first.
fn bench_export(args: &[String]) -> Result {
    let mut build = cargo();
    build.args(["build", "--release", "--locked", "-p", "diskctl"]);
    run("bench export: build diskctl", build)?;
    run_release("bench export", &["-p", "export_bench", "--"], args)
}

/// The fio comparison of `disk_blockdevice`: an example binary, since it needs root, loop
/// devices and fio rather than criterion's harness.
fn bench_blockdevice(args: &[String]) -> Result {
    run_release(
        "bench blockdevice",
        &["-p", "disk_blockdevice", "--example", "fio_compare", "--"],
        args,
    )
}

fn run_main_job(args: &[String]) -> Result {
    run_release("run", &["-p", "diskctl", "--", "bench"], args)
}

/// `cargo run --release --locked TARGET ARGS`: `target` picks the program and ends with `--`.
fn run_release(step: &str, target: &[&str], args: &[String]) -> Result {
    let mut c = cargo();
    c.args(["run", "--release", "--locked"]);
    c.args(target);
    c.args(args);
    run(step, c)
}

#[cfg(test)]
mod tests {
    use super::{FuzzStats, fuzz_stats, skip_summary};

    #[test]
    fn fuzz_statistics_are_read_from_the_last_lines() {
        let output = "#1024\tpulse  cov: 10 ft: 12 corp: 3/4b exec/s: 512 rss: 30Mb\n\
                      #5230455\tDONE   cov: 1596 ft: 6043 corp: 570/21Kb lim: 156 exec/s: 8717 rss: 376Mb\n\
                      Done 5230455 runs in 600 second(s)\n";
        assert_eq!(
            fuzz_stats(output),
            FuzzStats {
                executions: Some(5230455),
                per_second: Some(8717),
                seconds: Some(600),
            }
        );
        let stats =
            fuzz_stats("stat::number_of_executed_units: 77\nstat::average_exec_per_sec:   7\n");
        assert_eq!((stats.executions, stats.per_second), (Some(77), Some(7)));
        assert_eq!(
            fuzz_stats("==1== ERROR: libFuzzer: deadly signal\n"),
            FuzzStats::default()
        );
    }

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
