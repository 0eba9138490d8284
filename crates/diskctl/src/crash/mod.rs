//! Crash consistency: a writer process over a persistent stack killed with SIGKILL at a
//! random moment, then every sector of the stack checked against the writer's journal.
//!
//! `diskctl crash run` is the harness (`cargo xtask crash` runs it); `diskctl crash writer`
//! is the process it kills. Both are hidden from `diskctl --help`: they are a test, not a
//! user feature.
//!
//! What a kill proves: no acknowledged write is lost, no sector holds torn, misplaced or
//! foreign data, and nothing outside the requests in flight changed, when the *process*
//! dies at any point. It does not simulate a kernel crash or a power loss: what the process
//! handed the kernel survives a SIGKILL whether or not it was flushed. The journal records
//! the flushes anyway, so the same check of the durability contract (flushed and FUA writes
//! survive) runs unchanged on a machine that can really lose power (a VM).

mod harness;
mod journal;
mod model;
mod stamp;
mod writer;

use harness::RunArgs;
use writer::WriterArgs;

/// `diskctl crash ...`.
#[derive(clap::Subcommand, Debug)]
pub enum CrashCommand {
    /// Kill a writer on each stack many times and check what survives.
    Run(RunArgs),
    /// The writer the harness kills: random writes, unmaps and flushes with a journal.
    Writer(WriterArgs),
}

/// Runs `command`.
pub fn main(command: &CrashCommand) -> Result<(), String> {
    match command {
        CrashCommand::Run(args) => harness::run(args),
        CrashCommand::Writer(args) => writer::run(args),
    }
}
