//! `completions SHELL`: a completion script generated from the flags.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::Printer;

/// Prints the completion script for `shell` (any `--output`).
pub fn run<W: Write>(shell: Shell, printer: &mut Printer<W>) -> Result<Exit, CtlError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "registry-ctl", &mut script);
    printer.text(&String::from_utf8_lossy(&script))?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Format;

    #[test]
    fn scripts_name_the_commands_and_flags() {
        for (shell, marker) in [
            (Shell::Bash, "complete -F _registry__ctl"),
            (Shell::Zsh, "#compdef registry-ctl"),
            (Shell::Fish, "complete -c registry-ctl"),
        ] {
            let mut printer = Printer::new(Format::Table, Vec::new());
            assert_eq!(run(shell, &mut printer).unwrap(), Exit::Ok);
            let script = String::from_utf8(printer.finish().unwrap()).unwrap();
            assert!(script.contains(marker), "{shell}: {script}");
            for word in ["agent-check", "output", "tls-ca", "token-file"] {
                assert!(script.contains(word), "{shell} lacks {word}");
            }
        }
    }
}
