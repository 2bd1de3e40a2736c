//! registry-ctl: a small gRPC client of the node registry. It is the
//! HEALTHCHECK of both container images (`health` for registry-server,
//! `agent-check` for node-agent) and gives people and scripts the
//! registry's view of its nodes (`list`, `get`, `status`) as tables or
//! proto3 JSON; operators cordon and drain nodes with it (`cordon`,
//! `uncordon`, `drain`, `undrain`).
//!
//! Module map: [`cli`] flags; [`commands`] one module per command;
//! [`endpoint`] which registry to ask; [`connect`] token and TLS;
//! [`client`] the calls; [`agent`] a node-agent's own configuration;
//! [`output`] formats; [`error`] and [`exit`] what a failure means.

mod agent;
mod cli;
mod client;
mod commands;
mod connect;
mod endpoint;
mod error;
mod exit;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::exit::Exit;
use crate::output::Printer;

fn main() -> ExitCode {
    // Usage errors exit 2 here, through clap.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("registry-ctl: cannot start the async runtime: {err}");
            return Exit::No.into();
        }
    };
    let mut printer = Printer::new(cli.output, std::io::stdout().lock());
    let answer = runtime
        .block_on(commands::run(&cli, &mut printer))
        .and_then(|exit| printer.finish().map(|_| exit));
    match answer {
        Ok(exit) => exit.into(),
        Err(err) if err.is_broken_pipe() => Exit::Ok.into(),
        Err(err) => {
            eprintln!("registry-ctl: {err}");
            err.exit().into()
        }
    }
}
