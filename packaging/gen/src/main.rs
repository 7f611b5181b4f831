//! `vizor-gen OUTDIR`: writes vizor's man pages (`man/man1/vizor.1`, one page per
//! subcommand such as `man/man1/vizor-serve.1`) and shell completions (`completions/`: bash,
//! zsh, fish) from the command line's clap definitions, so they cannot drift from it.

use clap::CommandFactory;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The page of `cmd` (named `name`) and of each of its subcommands, recursively.
fn man_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize, String> {
    let cmd = cmd.clone().name(name.to_owned());
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .map_err(|e| format!("rendering {name}(1): {e}"))?;
    write(&dir.join(format!("{name}.1")), &out)?;
    let mut pages = 1;
    // clap's generated `help` subcommands get no page.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        pages += man_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(pages)
}

fn run(out: &Path) -> Result<(), String> {
    let mut cmd = vizor::cli::Cli::command();
    cmd.build();
    // man/man1, so that MANPATH=OUTDIR/man finds the pages before they are installed.
    let man = out.join("man").join("man1");
    let completions = out.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let pages = man_pages(&cmd, "vizor", &man)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "vizor"),
        (clap_complete::Shell::Zsh, "_vizor"),
        (clap_complete::Shell::Fish, "vizor.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "vizor", &mut buf);
        write(&completions.join(file), &buf)?;
    }
    eprintln!(
        "vizor-gen: {pages} man pages in {}, completions for bash, zsh and fish in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: vizor-gen OUTDIR");
        return ExitCode::from(2);
    };
    match run(&PathBuf::from(out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vizor-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
