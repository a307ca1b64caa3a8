//! Errors that stop a command before it could measure anything: the user asked for something
//! the machine or the workload cannot be (exit status 2), or the output went away.

use std::fmt;

use vmsys_arch::FormatId;
use vmsys_sim::testkit::KitError;
use vmsys_sim::ConfigError;

#[derive(Debug)]
pub enum CliError {
    /// `Machine::new` refused the configuration.
    Config { format: FormatId, err: ConfigError },
    /// The workload's page tables could not be built on this machine.
    Setup { format: FormatId, what: String },
    /// Writing the report failed (a closed pipe, say).
    Output(std::io::Error),
}

impl CliError {
    pub(crate) fn setup(format: FormatId, what: impl Into<String>) -> Self {
        CliError::Setup {
            format,
            what: what.into(),
        }
    }

    pub(crate) fn kit(format: FormatId, doing: &str, err: KitError) -> Self {
        CliError::Setup {
            format,
            what: format!("{doing}: {err}"),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Config { format, err } => {
                write!(f, "{format}: bad machine configuration: {err}")
            }
            CliError::Setup { format, what } => write!(f, "{format}: {what}"),
            CliError::Output(e) => write!(f, "writing the report: {e}"),
        }
    }
}

impl std::error::Error for CliError {}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Output(e)
    }
}
