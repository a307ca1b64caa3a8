//! `vmsim`: parse the command line, run the command, map the outcome to an exit status:
//! 0 success, 1 the run found a violation (or read a wrong value), 2 a usage or configuration
//! error.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use vmsim::cli::{Cli, Command};
use vmsim::{bench, layout, run};

const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cli.into_command() {
        Command::Run(args) => run::run(&args, &mut out).map(|r| r.failed()),
        Command::Layout(args) => layout::layout(&args, &mut out).map(|()| false),
        Command::Bench(args) => bench::bench(&args, &mut out).map(|()| false),
    };
    let _ = out.flush();
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vmsim: error: {e}");
            ExitCode::from(USAGE_ERROR)
        }
    }
}

/// `--help` and `--version` print in full; a usage error is one line.
fn parse_failure(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            // clap's message, up to its usage block, folded into one line: the problem and
            // any hint it gives ("[possible values: ...]", "tip: ...").
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let line = parts.join("; ");
            let line = line.trim_start_matches("error: ");
            eprintln!("vmsim: error: {line} (try --help)");
            ExitCode::from(USAGE_ERROR)
        }
    }
}
