//! `krvirt`: one binary for every role. The daemon roles (`up`, `server`,
//! `agent`) run the platform; the client verbs (`apply`, `get`,
//! `console`…, in `cli/`) talk to it over its REST API.

mod cli;
mod daemon;
mod fence_watchdog;
mod hostapi;
mod images;
mod secure;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "krvirt",
    version,
    about = "krvirt: KubeVirt-compatible virtualization on QEMU",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: cli::GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // ===== Daemon roles (integrator: replace the placeholders) ===========
    // Each gets its own Args struct and a `run` in its own module; the
    // global `--server` (cli.global.server) is there for `agent` to use.
    /// Run the API server, controllers and host agent in one process
    Up(daemon::UpArgs),
    /// Run the API server and controllers
    Server(daemon::ServerArgs),
    /// Run the host agent of this host against --server
    Agent(daemon::AgentArgs),
    /// (internal) The per-host fencing watchdog `krvirt agent` starts
    #[command(hide = true)]
    FenceWatchdog(fence_watchdog::WatchdogArgs),
    // ===== end of daemon roles ===========================================
    //
    // ===== Client verbs (src/cli) ========================================
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("KRVIRT_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn daemon_exit(role: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: krvirt {role}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // ----- daemon roles (integrator) -----
        Command::Up(args) => {
            init_logging();
            daemon_exit("up", daemon::up(args).await)
        }
        Command::Server(args) => {
            init_logging();
            daemon_exit("server", daemon::server(args).await)
        }
        Command::Agent(args) => {
            init_logging();
            daemon_exit(
                "agent",
                daemon::agent(args, cli.global.server.clone()).await,
            )
        }
        Command::FenceWatchdog(args) => {
            init_logging();
            daemon_exit("fence-watchdog", fence_watchdog::run(args).await)
        }
        // ----- client verbs -----
        Command::Client(cmd) => cli::run(cli.global, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_verb() {
        let c = Cli::try_parse_from([
            "krvirt",
            "-n",
            "prod",
            "get",
            "vms",
            "--server",
            "http://h:1",
        ])
        .expect("parse");
        assert_eq!(c.global.namespace.as_deref(), Some("prod"));
        assert_eq!(c.global.server.as_deref(), Some("http://h:1"));
        assert!(matches!(
            c.command,
            Command::Client(cli::ClientCommand::Get(_))
        ));
        let c = Cli::try_parse_from(["krvirt", "up"]).expect("up");
        assert!(matches!(c.command, Command::Up(_)));
    }

    #[test]
    fn bad_input_is_a_parse_error_not_a_panic() {
        for argv in [
            vec!["krvirt", "apply"],
            vec!["krvirt", "get"],
            vec!["krvirt", "get", "vms", "-o", "table"],
            vec!["krvirt", "wait", "vm1"],
            vec![
                "krvirt",
                "wait",
                "vm1",
                "--for",
                "Running",
                "--timeout",
                "soon",
            ],
            vec!["krvirt", "pause", "pod", "x"],
            vec!["krvirt", "stop", "vm1", "--grace-period", "x"],
        ] {
            assert!(Cli::try_parse_from(&argv).is_err(), "{argv:?}");
        }
    }
}
