//! The `vizor` command. Its subcommands (`serve`, `token`, `keygen`) arrive with the
//! proxy; today it reports its version and what it is built on.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("--version" | "-V") => {
            println!("vizor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!(
                "vizor: unknown command {other:?}: this build has no subcommands yet \
                 (`vizor serve` arrives with the proxy)"
            );
            ExitCode::from(2)
        }
    }
}
