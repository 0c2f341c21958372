//! `ubd`: the command line of the user-mode block driver.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A user-mode block driver for UML copy-on-write overlays.
///
/// An overlay ("COW file", User-Mode Linux's format) records which 512-byte
/// sectors of a read-only backing image have been written, and holds their new
/// contents. `ubd` creates, inspects and checks overlays, merges and converts
/// them, and serves them over NBD (to qemu, nbdfuse, the libnbd tools, fio);
/// UML, uml_mkcow and uml_moo read and write the same files.
#[derive(Debug, Parser)]
#[command(name = "ubd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Create(cli::create::Args),
    Info(cli::info::Args),
    Check(cli::check::Args),
    Bench(cli::bench::Args),
    Map(cli::map::Args),
    Compare(cli::compare::Args),
    Commit(cli::commit::Args),
    Rebase(cli::rebase::Args),
    Convert(cli::convert::Args),
    Serve(cli::serve::Args),
    Demo(cli::demo::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1, so that `ubd check` keeps 2 and 3 for what
            // it finds; but 2 for `ubd compare`, whose 1 means "they differ".
            let code = match std::env::args_os().nth(1) {
                _ if !e.use_stderr() => 0,
                Some(verb) if verb == "compare" => 2,
                _ => 1,
            };
            return ExitCode::from(code);
        }
    };
    if !matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        cli::serve::init_tool_logging();
    }
    let outcome = match cli.command {
        Command::Create(args) => cli::create::run(args),
        Command::Info(args) => cli::info::run(args),
        Command::Check(args) => cli::check::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Map(args) => cli::map::run(args),
        Command::Compare(args) => cli::compare::run(args),
        Command::Commit(args) => cli::commit::run(args),
        Command::Rebase(args) => cli::rebase::run(args),
        Command::Convert(args) => cli::convert::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Demo(args) => cli::demo::run(args),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ubd: {}", ubd::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
