//! `sentinel`: parses the command line and starts the controller, dev mode, or a PKI or config
//! subcommand.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sentinel::cli::deploy::DeployArgs;
use sentinel::cli::ClientArgs;
use sentinel::cli::EXIT_USAGE;
use sentinel::config::ControllerConfig;
use sentinel::pki::{self, Role};
use sentinel_daemon::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Sentinel controller: fleet state, signed jobs and deploys over mTLS.
#[derive(Debug, Parser)]
#[command(name = "sentinel", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Serve {
        /// Config file.
        #[arg(
            long,
            short,
            default_value = "/etc/sentinel/sentinel.toml",
            env = "SENTINEL_CONFIG"
        )]
        config: PathBuf,
    },
    /// Run a controller and a local agent (the hostagent binary) with a dev PKI.
    Dev {
        /// Where state and dev certificates live.
        #[arg(long, default_value = "./.sentinel-dev")]
        data_dir: PathBuf,
        /// The controller's listen address.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// The local agent's report interval.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        report_interval: Duration,
        /// Where the controller's Prometheus metrics are served.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_listen: SocketAddr,
        /// Where the local agent's Prometheus metrics are served.
        #[arg(long, default_value = "127.0.0.1:9465")]
        agent_metrics_listen: SocketAddr,
    },
    /// Create dev certificates and keys.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Audit database isolation, or print (and apply) the fix.
    #[command(subcommand)]
    Isolation(IsolationCommand),
    /// List the fleet's hosts, or revoke or forget one.
    Hosts {
        #[command(subcommand)]
        command: Option<sentinel::cli::revoke::HostsCommand>,
        #[command(flatten)]
        client: ClientArgs,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an operator's certificates, lift that, or list the deny list.
    Operators {
        #[command(subcommand)]
        command: sentinel::cli::revoke::OperatorsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one host: system, containers, nginx, Redis, PostgreSQL, collectors' errors.
    Host {
        /// The host's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
        /// JSON for scripts (the API's Host message, as grpcurl prints it).
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Jobs {
        #[command(flatten)]
        args: sentinel::cli::jobs::JobsArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List deploys and rollbacks, newest first.
    Deploys {
        #[command(flatten)]
        args: sentinel::cli::jobs::DeploysArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deploy an app: staging, E2E, production; or watch or cancel a deploy.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Deploy {
        #[command(subcommand)]
        command: Option<sentinel::cli::deploy::DeployCommand>,
        #[command(flatten)]
        args: DeployArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll an app's environment back to its previous (or a given) release.
    Rollback {
        /// The app.
        app: String,
        /// staging or production.
        #[arg(long)]
        env: String,
        /// The release to go back to [default: the previous one].
        #[arg(long)]
        to: Option<String>,
        /// Follow it and exit with its outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Backups: list them, or run a backup, verify or restore test now.
    Backups {
        #[command(subcommand)]
        command: sentinel::cli::backups::BackupsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The audit trail: every write made through the API, newest first.
    Audit {
        #[command(flatten)]
        args: sentinel::cli::audit::AuditArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lock an app: its deploys and rollbacks are refused, with the reason, until unlocked.
    Lock {
        /// The app.
        app: String,
        /// Why (shown to whoever is refused).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an app's lock.
    Unlock {
        /// The app.
        app: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the held app locks.
    Locks {
        #[command(flatten)]
        client: ClientArgs,
        /// JSON for scripts (the API's ListLocksResponse, as grpcurl prints it).
        #[arg(long)]
        json: bool,
    },
    /// Join tokens: one-time credentials that enrol a new host (`hostagent enroll`).
    Token {
        #[command(subcommand)]
        command: sentinel::cli::token::TokenCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a fleet CA, controller, host and admin certificates and the job-signing keys.
    Init {
        /// Directory to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Extra subject alternative names for the controller certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Hosts to issue certificates for (default: the dev fleet and this machine).
        #[arg(long = "host", conflicts_with = "no_hosts")]
        hosts: Vec<String>,
        /// Issue no host certificates (hosts enrol with join tokens instead).
        #[arg(long)]
        no_hosts: bool,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a host certificate signed by the CA in DIR.
    IssueHost {
        /// The host name, as the agent will present it.
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// Certificate lifetime [default: 365d].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        force: bool,
    },
    /// Rotate the job-signing key: make the next key (announced to agents once the config's
    /// `[signing] next_key` names signing-next.pub), or with --promote make it the signing key.
    RotateSigningKey {
        /// The PKI directory holding signing.key.
        #[arg(long)]
        dir: PathBuf,
        /// Make signing-next.* the signing key (the old one is kept as signing-old.*).
        #[arg(long)]
        promote: bool,
        /// Overwrite an existing signing-next.* (or signing-old.* when promoting).
        #[arg(long)]
        force: bool,
    },
    /// Issue an operator certificate with a role.
    IssueOperator {
        /// The operator's name.
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long)]
        dir: PathBuf,
        /// Certificate lifetime [default: 365d].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        force: bool,
    },
    /// Create the online issuing CA (issuer.pem, issuer.key) signed by the CA in DIR; the
    /// controller's [pki] issues host certificates with it, so the CA key can go offline.
    InitIssuer {
        #[arg(long)]
        dir: PathBuf,
        /// The issuing CA's lifetime [default: 365d, at most the CA's].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum IsolationCommand {
    /// Audit the cluster against the config's [isolation] policy and print the report. Exit 0:
    /// isolated; 1: violations or policy problems; 2: the check could not run.
    Check {
        /// Controller config file with an [isolation] section.
        #[arg(
            long,
            short,
            default_value = "/etc/sentinel/sentinel.toml",
            env = "SENTINEL_CONFIG"
        )]
        config: PathBuf,
        /// Print the report as JSON (the API's field names) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the statements that close every hole found; with --apply run them in one
    /// transaction and check again. Exit codes as for `check` (after --apply: of the new check).
    Fix {
        /// Controller config file with an [isolation] section.
        #[arg(
            long,
            short,
            default_value = "/etc/sentinel/sentinel.toml",
            env = "SENTINEL_CONFIG"
        )]
        config: PathBuf,
        /// Run the statements (one transaction), then check again.
        #[arg(long)]
        apply: bool,
        /// Apply as this DSN (a file) instead of the auditor, which needs no privilege while
        /// fixing needs the databases' owner or a superuser.
        #[arg(long, requires = "apply")]
        dsn_file: Option<PathBuf>,
        /// The password for --dsn-file (a file).
        #[arg(long, requires = "dsn_file")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a controller config file; exit 64 with the reason when it is invalid.
    Check {
        /// The file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    if let Some(dir) = sentinel_daemon::docs::requested(std::env::args_os()) {
        return sentinel_daemon::docs::generate_main(
            <Cli as clap::CommandFactory>::command(),
            &dir,
        );
    }
    // Usage errors exit 64 like config errors (clap's own default is 2, which here means "the
    // controller could not be reached"); --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    logging::init(cli.log_format);
    match cli.command {
        Command::Serve { config } => {
            let config = match ControllerConfig::load_for_daemon(&config) {
                Ok(c) => c,
                Err(code) => return ExitCode::from(code),
            };
            run_async(|shutdown| async move {
                config.log_start();
                // systemd (Type=notify) hears READY=1 once the gRPC listener is bound.
                let (ready, listening) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Ok(addr) = listening.await {
                        sentinel_daemon::systemd::ready(&format!("serving on {addr}"));
                    }
                });
                sentinel::server::run(config, shutdown, Some(ready)).await
            })
        }
        Command::Dev {
            data_dir,
            listen,
            report_interval,
            metrics_listen,
            agent_metrics_listen,
        } => run_async(|shutdown| {
            sentinel::dev::run(
                sentinel::dev::DevOptions {
                    data_dir,
                    listen,
                    report_interval,
                    metrics_listen,
                    agent_metrics_listen,
                    log_format: cli.log_format,
                },
                shutdown,
            )
        }),
        Command::Pki(cmd) => ExitCode::from(match cmd {
            PkiCommand::Init {
                dir,
                sans,
                hosts,
                no_hosts,
                force,
            } => pki::cli::init_command(
                pki::InitOptions {
                    dir,
                    extra_sans: sans,
                    hosts,
                    force,
                },
                no_hosts,
            ),
            PkiCommand::IssueHost {
                name,
                dir,
                ttl,
                force,
            } => pki::cli::issue_host_command(&dir, &name, ttl, force),
            PkiCommand::IssueOperator {
                name,
                role,
                dir,
                ttl,
                force,
            } => pki::cli::issue_operator_command(&dir, &name, role, ttl, force),
            PkiCommand::InitIssuer { dir, ttl, force } => {
                pki::cli::init_issuer_command(&dir, ttl, force)
            }
            PkiCommand::RotateSigningKey {
                dir,
                promote,
                force,
            } => pki::cli::rotate_signing_key_command(&dir, promote, force),
        }),
        Command::Hosts {
            command: Some(command),
            client,
            ..
        } => client_call(sentinel::cli::revoke::hosts(&client, command)),
        Command::Hosts {
            command: None,
            client,
            json,
        } => client_call(sentinel::cli::fleet::hosts(&client, json)),
        Command::Operators { command, client } => {
            client_call(sentinel::cli::revoke::operators(&client, command))
        }
        Command::Host { name, client, json } => {
            client_call(sentinel::cli::host::show(&client, name, json))
        }
        Command::Jobs { args, client } => client_call(sentinel::cli::jobs::jobs(&client, args)),
        Command::Audit { args, client } => client_call(sentinel::cli::audit::audit(&client, args)),
        Command::Lock {
            app,
            reason,
            client,
        } => client_call(sentinel::cli::audit::lock(&client, app, reason)),
        Command::Unlock { app, client } => client_call(sentinel::cli::audit::unlock(&client, app)),
        Command::Locks { client, json } => client_call(sentinel::cli::audit::locks(&client, json)),
        Command::Deploys { args, client } => {
            client_call(sentinel::cli::jobs::deploys(&client, args))
        }
        Command::Deploy {
            command,
            args,
            client,
        } => client_call(sentinel::cli::deploy::command(&client, command, args)),
        Command::Rollback {
            app,
            env,
            to,
            wait,
            client,
        } => client_call(sentinel::cli::deploy::rollback(&client, app, env, to, wait)),
        Command::Backups { command, client } => {
            client_call(sentinel::cli::backups::backups(&client, command))
        }
        Command::Token { command, client } => {
            client_call(sentinel::cli::token::token(&client, command))
        }
        Command::Isolation(cmd) => isolation(cmd),
        Command::Config(ConfigCommand::Check { file }) => {
            ExitCode::from(sentinel::config::check_command(&file))
        }
    }
}

/// The one runtime builder of the binary: multi-threaded for the daemon, current-thread for
/// one-shot commands. When the runtime cannot start, says so and gives `failure` as exit code.
fn runtime(multi_thread: bool, failure: ExitCode) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("sentinel: starting the runtime: {e}");
        failure
    })
}

/// Runs one operator call on a small runtime; its error means the controller was unreachable
/// or refused the call.
fn client_call(f: impl std::future::Future<Output = anyhow::Result<u8>>) -> ExitCode {
    let runtime = match runtime(false, ExitCode::FAILURE) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(f) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sentinel: {e:#}");
            ExitCode::from(sentinel::cli::EXIT_UNAVAILABLE)
        }
    }
}

/// `sentinel isolation check|fix`: exit 64 on a bad config, else the command's own code.
fn isolation(cmd: IsolationCommand) -> ExitCode {
    use sentinel::isolation::cli;
    let file = match &cmd {
        IsolationCommand::Check { config, .. } | IsolationCommand::Fix { config, .. } => config,
    };
    let policy = match ControllerConfig::load_isolation_for_command(file) {
        Ok(policy) => policy,
        Err(code) => return ExitCode::from(code),
    };
    let runtime = match runtime(false, ExitCode::from(cli::EXIT_ERROR)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    ExitCode::from(runtime.block_on(async {
        match cmd {
            IsolationCommand::Check { json, .. } => cli::check_command(&policy, json).await,
            IsolationCommand::Fix {
                apply,
                dsn_file,
                password_file,
                ..
            } => {
                let apply_as = cli::ApplyAs {
                    dsn_file,
                    password_file,
                };
                cli::fix_command(&policy, apply, &apply_as).await
            }
        }
    }))
}

/// Runs `f` on a multi-threaded runtime until it ends or SIGTERM/SIGINT asks it to stop.
fn run_async<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let runtime = match runtime(true, ExitCode::FAILURE) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let mut task = tokio::spawn(f(shutdown.clone()));
        let result = tokio::select! {
            r = &mut task => r,
            _ = sentinel_daemon::signal::shutdown() => {
                tracing::info!("shutting down");
                sentinel_daemon::systemd::stopping();
                shutdown.cancel();
                // Grace period: long enough to flush the store and close streams cleanly,
                // short enough for systemd's default stop timeout.
                match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!("shutdown grace period over; exiting");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("sentinel: {e:#}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("sentinel: task failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
