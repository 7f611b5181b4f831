//! The `vizor` command.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match vizor::cli::run(vizor::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vizor: {e}");
            ExitCode::FAILURE
        }
    }
}
