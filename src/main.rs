//! The `perfagg` command: parses the command line, loads the configuration, sets up logging
//! and dispatches to the daemon or to a one-shot command. Errors are printed here once, with
//! their whole chain, and mapped to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use perfagg::config::{mask_uri, Config, Environment};
use perfagg::error::chain;
use perfagg::reset::request::ResetArgs;
use perfagg::{daemon, deployment, logging, shutdown, Error};

/// Merges n8n staging documents into performance_data through a MongoDB change stream.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT.
    Run(ConfigArgs),
    /// Validate the configuration, connect, and print the effective settings.
    CheckConfig(ConfigArgs),
    /// Show the stored position, its lag, the lease holder, counts and resets.
    Status(StatusArgs),
    /// Reset the stored position to reprocess changes; a running daemon performs it.
    Reset(ResetCommand),
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON for scripts instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ResetCommand {
    #[command(flatten)]
    config: ConfigArgs,
    /// Replay the change stream from TIME (RFC 3339, or YYYY-MM-DD meaning its midnight in
    /// merge.timezone); with --rescan, merge only staging documents dated on or after this day.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Merge the staging documents again in insertion order, then continue the stream from
    /// when the rescan began.
    #[arg(long)]
    rescan: bool,
    /// Forget the stored position and continue from now, skipping the backlog.
    #[arg(long)]
    to_now: bool,
    /// Clear perfagg's fields in every target document, then rescan everything.
    #[arg(long)]
    rebuild: bool,
    /// Do not ask for confirmation (required without a terminal).
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// Configuration file [default: /etc/perfagg/perfagg.toml if it exists, else built-in
    /// defaults]. PERFAGG_MONGODB_URI, PERFAGG_DATABASE, PERFAGG_LOG and PERFAGG_LOG_FORMAT
    /// override its values.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

/// Exit code of a command line that cannot be parsed, the same as for other invalid requests,
/// so that it cannot be mistaken for exit code 2 (no change streams).
const USAGE_EXIT_CODE: u8 = 1;

/// Time given to the driver's background tasks (such as killing the change stream's cursor)
/// to finish after the daemon stopped, before the runtime shuts down.
const DRIVER_CLEANUP_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version output are not errors.
            let code = if error.use_stderr() {
                USAGE_EXIT_CODE
            } else {
                0
            };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    let is_daemon = matches!(cli.command, Command::Run(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("perfagg: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let result = match cli.command {
            Command::Run(args) => run(&args).await,
            Command::CheckConfig(args) => check_config(&args).await,
            Command::Status(args) => status(&args).await,
            Command::Reset(args) => reset(&args).await,
        };
        tokio::time::sleep(DRIVER_CLEANUP_GRACE).await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The daemon's log gets the error as an event too; one-shot commands print it once.
            if is_daemon {
                tracing::error!(
                    error = chain(&error),
                    exit_code = error.exit_code(),
                    "Stopped with an error."
                );
            }
            eprintln!("perfagg: error: {}", chain(&error));
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(args: &ConfigArgs) -> Result<(), Error> {
    let config = Config::load(args.config.as_deref(), &Environment::from_process())?;
    logging::init(&config.log);
    daemon::log_start(&config);

    let token = CancellationToken::new();
    let signals = shutdown::listen(token.clone()).map_err(|source| Error::ConfigRead {
        path: "signal handlers".to_string(),
        source,
    })?;
    let progress = Arc::new(daemon::Progress::default());
    let result = daemon::run(&config, &token, progress).await;
    signals.abort();
    if result.is_ok() {
        tracing::info!("Stopped.");
    }
    result
}

async fn status(args: &StatusArgs) -> Result<(), Error> {
    let config = load_quiet(&args.config)?;
    perfagg::status::run(&config, args.json).await
}

async fn reset(args: &ResetCommand) -> Result<(), Error> {
    let config = load_quiet(&args.config)?;
    let reset_args = ResetArgs {
        since: args.since.clone(),
        rescan: args.rescan,
        to_now: args.to_now,
        rebuild: args.rebuild,
        yes: args.yes,
    };
    perfagg::reset::request::run(&config, &reset_args).await
}

/// Loads the configuration for a one-shot command, whose log shows only warnings and errors
/// unless PERFAGG_LOG sets another level.
fn load_quiet(args: &ConfigArgs) -> Result<Config, Error> {
    let mut environment = Environment::from_process();
    environment.log.get_or_insert_with(|| "warn".to_string());
    let config = Config::load(args.config.as_deref(), &environment)?;
    logging::init(&config.log);
    Ok(config)
}

async fn check_config(args: &ConfigArgs) -> Result<(), Error> {
    let config = Config::load(args.config.as_deref(), &Environment::from_process())?;
    logging::init(&config.log);
    let client = deployment::connect(&config).await?;
    let deployment = deployment::check(&client, &config).await?;
    println!("# effective settings, from {}", config.origin);
    print!("{}", config.to_toml_masked());
    println!();
    println!(
        "# connected to {}: {}, MongoDB {}",
        mask_uri(&config.mongodb.uri),
        deployment.replica_set.map_or_else(
            || "sharded cluster".to_string(),
            |name| format!("replica set {name}")
        ),
        deployment.server_version
    );
    Ok(())
}
