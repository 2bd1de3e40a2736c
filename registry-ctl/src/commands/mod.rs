//! One module per command. Each takes the [`Context`] (the global flags)
//! and its own arguments, prints through a [`Printer`], and returns the
//! [`Exit`] status of its answer; errors carry their own (see
//! [`CtlError::exit`](crate::error::CtlError::exit)).

pub mod agent_check;
pub mod completions;
pub mod cordon;
pub mod drain;
pub mod find;
pub mod get;
pub mod health;
pub mod list;
pub mod models;
pub mod status;
pub mod watch;

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cli::{Cli, Command};
use crate::client::Registry;
use crate::connect::Credentialing;
use crate::endpoint;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::Printer;

/// What every command gets from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--registry`, if given.
    pub registry: Option<String>,
    /// `--timeout`.
    pub timeout: Duration,
    /// The token and TLS flags.
    pub credentials: Credentialing,
    /// The time ages are measured against.
    pub now: DateTime<Utc>,
}

impl Context {
    /// The global flags of `cli`, checked.
    pub fn from_cli(cli: &Cli) -> Result<Self, CtlError> {
        Ok(Context {
            registry: cli.registry.clone(),
            timeout: cli.timeout,
            credentials: Credentialing::from_cli(cli)?,
            now: Utc::now(),
        })
    }

    /// The endpoints of the query and admin commands: --registry (one
    /// URL or the replicas' URLs), else http://127.0.0.1:50051.
    fn query_endpoints(&self) -> Result<Vec<String>, CtlError> {
        endpoint::parse(&endpoint::for_queries(self.registry.as_deref()))
    }

    /// A connection for the query commands: the first replica that
    /// answers (a follower warns on stderr when its answer may be stale).
    pub async fn query_registry(&self) -> Result<Registry, CtlError> {
        let urls = self.query_endpoints()?;
        Registry::connect(&self.credentials.towards(urls, self.timeout)).await
    }

    /// A connection for the admin commands: the leader among the
    /// replicas (and a follower's refusal is followed to the leader it
    /// names).
    pub async fn admin_registry(&self) -> Result<Registry, CtlError> {
        let urls = self.query_endpoints()?;
        Registry::connect_leader(&self.credentials.towards(urls, self.timeout)).await
    }
}

/// Runs the command of `cli`. `completions` needs no registry and no
/// checked token or TLS flags; every other command gets the [`Context`].
pub async fn run<W: Write>(cli: &Cli, printer: &mut Printer<W>) -> Result<Exit, CtlError> {
    let context = || Context::from_cli(cli);
    match &cli.command {
        Command::Completions { shell } => completions::run(*shell, printer),
        Command::Health { service } => health::run(&context()?, service, printer).await,
        Command::List {
            status,
            pool,
            labels,
        } => {
            let filter = list::Filter {
                status: *status,
                pool: pool.clone(),
                labels: labels.clone(),
            };
            list::run(&context()?, &filter, printer).await
        }
        Command::Find(args) => find::run(&context()?, &args.query(), printer).await,
        Command::Models { model } => models::run(&context()?, model.as_deref(), printer).await,
        Command::Watch {
            status,
            pool,
            labels,
            model,
            from_revision,
        } => {
            let filter = watch::Filter {
                list: list::Filter {
                    status: *status,
                    pool: pool.clone(),
                    labels: labels.clone(),
                },
                model: model.clone(),
            };
            watch::run(&context()?, &filter, *from_revision, printer).await
        }
        Command::Get { node_id } => get::run(&context()?, node_id, printer).await,
        Command::Status { node_id } => status::run(&context()?, node_id, printer).await,
        Command::AgentCheck { pid } => agent_check::run(&context()?, *pid, printer).await,
        Command::Cordon { node_id, reason } => {
            cordon::cordon(&context()?, node_id, reason, printer).await
        }
        Command::Uncordon { node_id } => cordon::uncordon(&context()?, node_id, printer).await,
        Command::Drain(args) => drain::drain(&context()?, args, printer).await,
        Command::Undrain { node_id } => drain::undrain(&context()?, node_id, printer).await,
    }
}
