//! `cargo xtask <verb>`: the one entry point for every routine the README or CI runs.
//!
//! Run `cargo xtask help` for the verbs.

#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

const HELP: &str = "\
usage: cargo xtask <verb> [args]

verbs:
  fmt                 check formatting (cargo fmt --check)
  clippy              lint every target; warnings are errors
  test                run every test, doc tests included
  doc                 build the docs; warnings are errors
  ci                  fmt, clippy, test, doc, in that order; stops at the first failure
  stress [SEEDS]      the conformance model tests over SEEDS random seeds (default 200),
                      release build; set DISK_CONFORMANCE_SEED=N to replay one seed
  bench [NAME]        criterion benchmarks (all, or the bench target NAME)
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
    let mut c = cargo();
    c.args(["test", "--workspace", "--all-targets", "--locked"]);
    run("test", c)?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--doc", "--locked"]);
    run("doc tests", c)
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
    test()?;
    doc()?;
    eprintln!("xtask: ci passed");
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
        "conformance",
    ]);
    c.env("DISK_CONFORMANCE_SEEDS", seeds);
    run("stress", c)
}

fn bench(args: &[String]) -> Result {
    let mut c = cargo();
    c.args(["bench", "--workspace", "--locked"]);
    if let [name] = args {
        c.args(["--bench", name]);
    } else if !args.is_empty() {
        return Err("usage: cargo xtask bench [NAME]".into());
    }
    run("bench", c)
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
