//! Small MongoDB client for the development scripts, which cannot assume that mongosh is
//! installed: `scripts/dev-replset` uses it to initiate its single-node replica set and wait
//! for a primary, and `scripts/demo` to check the server it was given.
//!
//! Run it as `cargo run --example devtool -- <command>`; `--help` lists the commands.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::ClientOptions;
use mongodb::Client;

/// Server error code `AlreadyInitialized`, returned by `replSetInitiate` on an initiated set.
const ALREADY_INITIALIZED: i32 = 23;

/// Pause between two readiness checks.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Parser)]
#[command(about = "MongoDB helper for perfagg's development scripts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exit with 0 if a server replies to `ping` at URI, 1 otherwise.
    Ping {
        #[arg(long)]
        uri: String,
        /// How long to wait for a reply, in seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Initiate a single-member replica set on 127.0.0.1:PORT unless it already is one,
    /// then wait until that member is primary.
    InitReplset {
        #[arg(long)]
        port: u16,
        /// Replica set name; must match mongod's --replSet.
        #[arg(long, default_value = "rs0")]
        set_name: String,
        /// How long to wait for the member to become primary, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Wait until the deployment at URI has a writable primary.
    WaitPrimary {
        #[arg(long)]
        uri: String,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Print the replica set name and state of the server on 127.0.0.1:PORT.
    Status {
        #[arg(long)]
        port: u16,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ping { uri, timeout_secs } => ping(&uri, Duration::from_secs(timeout_secs)).await,
        Command::InitReplset {
            port,
            set_name,
            timeout_secs,
        } => init_replset(port, &set_name, Duration::from_secs(timeout_secs)).await,
        Command::WaitPrimary { uri, timeout_secs } => {
            wait_primary(&uri, Duration::from_secs(timeout_secs)).await
        }
        Command::Status { port } => status(port).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("devtool: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Connects a client to `uri` whose operations give up after `timeout` without a server.
async fn connect(uri: &str, timeout: Duration) -> Result<Client, String> {
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|error| format!("invalid connection string {uri}: {error}"))?;
    options.server_selection_timeout = Some(timeout);
    Client::with_options(options).map_err(|error| format!("cannot connect to {uri}: {error}"))
}

/// Connects to the one server on 127.0.0.1:`port`, whatever its replica set state.
async fn connect_direct(port: u16, timeout: Duration) -> Result<Client, String> {
    connect(
        &format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        timeout,
    )
    .await
}

async fn hello(client: &Client) -> Result<Document, String> {
    client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(|error| format!("hello failed: {error}"))
}

async fn ping(uri: &str, timeout: Duration) -> Result<(), String> {
    let client = connect(uri, timeout).await?;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .map_err(|error| format!("no answer to ping at {uri}: {error}"))?;
    Ok(())
}

async fn init_replset(port: u16, set_name: &str, timeout: Duration) -> Result<(), String> {
    let client = connect_direct(port, timeout).await?;
    let config = doc! {
        "_id": set_name,
        "members": [{ "_id": 0, "host": format!("127.0.0.1:{port}") }],
    };
    let result = client
        .database("admin")
        .run_command(doc! { "replSetInitiate": config })
        .await;
    match result {
        Ok(_) => eprintln!("devtool: initiated replica set {set_name} on 127.0.0.1:{port}"),
        Err(error) if command_error_code(&error) == Some(ALREADY_INITIALIZED) => {}
        Err(error) => {
            return Err(format!(
                "replSetInitiate on 127.0.0.1:{port} failed: {error}"
            ))
        }
    }

    // A client that connected directly before the set existed keeps treating the server as
    // a standalone, so readiness is checked with a new client that discovers the set.
    let set_uri = format!("mongodb://127.0.0.1:{port}/?replicaSet={set_name}");
    wait_primary(&set_uri, timeout).await
}

async fn wait_primary(uri: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let client = connect(uri, Duration::from_secs(2)).await?;
    loop {
        // `ping` goes to the primary, so it succeeds only once there is one.
        let last_error = match client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
        {
            Ok(_) => match hello(&client).await {
                Ok(reply) if reply.get_bool("isWritablePrimary").unwrap_or(false) => return Ok(()),
                Ok(_) => "the server is not a writable primary yet".to_string(),
                Err(message) => message,
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{uri} has no writable primary after {timeout:?}: {last_error}"
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn status(port: u16) -> Result<(), String> {
    let client = connect_direct(port, Duration::from_secs(2)).await?;
    let reply = hello(&client).await?;
    let state = if reply.get_bool("isWritablePrimary").unwrap_or(false) {
        "PRIMARY"
    } else if reply.get_bool("secondary").unwrap_or(false) {
        "SECONDARY"
    } else {
        "not primary or secondary"
    };
    match reply.get_str("setName") {
        Ok(set_name) => println!("replica set {set_name}, 127.0.0.1:{port} is {state}"),
        Err(_) if reply.get_bool("isreplicaset").unwrap_or(false) => {
            println!("127.0.0.1:{port} runs with --replSet but the set is not initiated")
        }
        Err(_) => println!("127.0.0.1:{port} is a standalone server, not a replica set member"),
    }
    Ok(())
}

fn command_error_code(error: &mongodb::error::Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(command_error) => Some(command_error.code),
        _ => None,
    }
}
