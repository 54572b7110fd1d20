//! `hostagent`: parses the command line, loads the config and runs the agent until SIGTERM.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hostagent::AgentConfig;
use sentinel_daemon::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Sentinel host agent: reports this host's state to the controller over mTLS and runs the
/// jobs the controller signed.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        short,
        default_value = "/etc/hostagent/agent.toml",
        env = "HOSTAGENT_CONFIG"
    )]
    config: PathBuf,
    /// Check the config file and exit (0 when valid, 64 when not).
    #[arg(long)]
    check_config: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Stop when standard input closes: `sentinel dev` runs the agent with a pipe, so the
    /// agent never outlives it, even when it is killed with SIGKILL.
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enrol this host with a join token (`sentinel token create`): make a key here, get its
    /// certificate, the fleet CA and the signing keys, and write an agent config.
    Enroll {
        /// The controller's address, host:port.
        #[arg(long)]
        controller: String,
        /// The join token.
        #[arg(long, env = "HOSTAGENT_JOIN_TOKEN")]
        token: String,
        /// Where the key, certificates and agent.toml go.
        #[arg(long, default_value = "/etc/hostagent")]
        dir: PathBuf,
        /// TLS server name to expect in the controller's certificate [default: the
        /// address's host].
        #[arg(long)]
        server_name: Option<String>,
    },
}

/// sysexits' EX_USAGE: the config was wrong, restarting will not help.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    if let Some(dir) = sentinel_daemon::docs::requested(std::env::args_os()) {
        return sentinel_daemon::docs::generate_main(
            <Cli as clap::CommandFactory>::command(),
            &dir,
        );
    }
    // Usage errors exit 64 like config errors (clap's own default is 2); --help and --version 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    logging::init(cli.log_format);
    if let Some(Command::Enroll {
        controller,
        token,
        dir,
        server_name,
    }) = cli.command
    {
        return enroll(hostagent::enroll::EnrollOptions {
            controller,
            token,
            dir,
            server_name,
        });
    }
    let config = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hostagent: invalid config: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // The same checks at start-up as for --check-config: a daemon with a wrong file exits 64
    // (systemd's RestartPreventExitStatus) instead of retrying a handshake for ever.
    if let Err(e) = config.check_files(&cli.config) {
        eprintln!("hostagent: invalid config: {e}");
        return ExitCode::from(EX_USAGE);
    }
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    // One thread is plenty for an agent that mostly sleeps, and keeps its footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hostagent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        tracing::info!(
            file = %cli.config.display(),
            host = %config.host_name(),
            controller = %config.controller,
            report_interval = ?config.report_interval,
            collectors = %config.collectors.enabled_names(),
            state_dir = %config.jobs.state_dir.display(),
            metrics = %if config.metrics.enabled { config.metrics.listen.to_string() } else { "off".into() },
            "hostagent starting"
        );
        let shutdown = CancellationToken::new();
        let mut agent = tokio::spawn(hostagent::run(
            config,
            Some(cli.config.clone()),
            shutdown.clone(),
        ));
        // A start-up failure (unreadable key, journal) ends the process at once, so that
        // systemd sees it and restarts, instead of idling until SIGTERM.
        let parent_gone = async {
            if cli.exit_with_stdin {
                stdin_closed().await
            } else {
                std::future::pending().await
            }
        };
        let result = tokio::select! {
            r = &mut agent => r,
            _ = parent_gone => {
                tracing::info!("standard input closed (sentinel dev stopped): stopping");
                shutdown.cancel();
                agent.await
            }
            _ = sentinel_daemon::signal::shutdown() => {
                sentinel_daemon::systemd::stopping();
                shutdown.cancel();
                agent.await
            }
        };
        match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                tracing::error!(error = format!("{e:#}"), "agent failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                tracing::error!(error = %e, "agent task panicked");
                ExitCode::FAILURE
            }
        }
    })
}

/// `hostagent enroll`: prints what it wrote; exit 0, 64 for a malformed token, 1 otherwise.
fn enroll(opts: hostagent::enroll::EnrollOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hostagent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(hostagent::enroll::enroll(&opts)) {
        Ok(done) => {
            for path in &done.written {
                println!("wrote {}", path.display());
            }
            let (config, written) = &done.config;
            if !written {
                println!(
                    "kept the existing {} (check that its [tls] and [jobs] trusted_keys point at the files above)",
                    config.display()
                );
            }
            println!(
                "enrolled host {:?}; certificate valid until {}; start the agent with --config {}",
                done.host,
                done.not_after,
                config.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hostagent enroll: {e}");
            ExitCode::from(match e {
                hostagent::enroll::EnrollError::Token(_) => EX_USAGE,
                _ => 1,
            })
        }
    }
}

/// Resolves when standard input reaches its end (or fails): the writing side is gone.
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
