//! Connecting to MongoDB and checking that the deployment can serve change streams and
//! transactions. A standalone mongod gets an error that explains how to fix it,
//! including when the URI names a replica set that the server is not part of.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;

use crate::config::{mask_uri, Config, Environment, ENV_URI};
use crate::error::{describe, Action, Error};
use crate::retry::{self, Failure};

/// How long the driver looks for a suitable server before an operation fails; the
/// supervisor's backoff then decides when to try again.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each direct probe of a seed host may take when looking for a standalone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Facts the check learned about the deployment, for `check-config` and the start-up log.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Replica set name, or `None` behind a mongos.
    pub replica_set: Option<String>,
    pub server_version: String,
}

/// Builds a client for the configured URI. The driver connects lazily, so this fails only
/// for a URI it cannot parse.
///
/// # Errors
///
/// [`Error::Config`] naming `mongodb.uri` when the URI is invalid.
pub async fn connect(config: &Config) -> Result<Client, Error> {
    let mut options = parse_options(config).await?;
    options.app_name = Some(format!("perfagg {}", env!("CARGO_PKG_VERSION")));
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
    }
    Client::with_options(options).map_err(|error| invalid_uri(config, &error))
}

/// Asks the server which kind of deployment it belongs to.
///
/// # Errors
///
/// [`Error::NoChangeStreams`] for a standalone mongod, and [`Error::Mongo`] when no server
/// replies (the caller retries).
pub async fn check(client: &Client, config: &Config) -> Result<Deployment, Error> {
    let admin = client.database("admin");
    let hello = match admin.run_command(doc! { "hello": 1 }).await {
        Ok(hello) => hello,
        Err(error) => {
            // With replicaSet= in the URI the driver ignores a standalone server or a member
            // of another set instead of reporting it; ask each seed host directly so the
            // operator gets the real reason.
            if let Some(explained) = probe_seed_hosts(config).await {
                return Err(explained);
            }
            return Err(check_failed(config, error));
        }
    };
    if !serves_change_streams(&hello) {
        return Err(Error::NoChangeStreams {
            uri: mask_uri(&config.mongodb.uri),
        });
    }
    let build_info = admin
        .run_command(doc! { "buildInfo": 1 })
        .await
        .map_err(|error| check_failed(config, error))?;
    Ok(Deployment {
        replica_set: hello.get_str("setName").ok().map(str::to_string),
        server_version: build_info
            .get_str("version")
            .unwrap_or("unknown")
            .to_string(),
    })
}

fn check_failed(config: &Config, error: mongodb::error::Error) -> Error {
    if retry::classify(&error) == Failure::Authentication {
        return Error::Authentication {
            uri: mask_uri(&config.mongodb.uri),
            error: Box::new(error),
        };
    }
    Error::mongo(Action::CheckDeployment)(error)
}

fn serves_change_streams(hello: &Document) -> bool {
    hello.contains_key("setName") || hello.get_str("msg") == Ok("isdbgrid")
}

/// Asks each seed host directly what it is, to explain why the driver found no server.
/// Returns the first explanation found: a standalone server, or a member of another
/// replica set than the URI names.
async fn probe_seed_hosts(config: &Config) -> Option<Error> {
    let options = parse_options(config).await.ok()?;
    let expected = options.repl_set_name.clone();
    for host in &options.hosts {
        let mut direct = options.clone();
        direct.hosts = vec![host.clone()];
        direct.direct_connection = Some(true);
        direct.repl_set_name = None;
        direct.server_selection_timeout = Some(PROBE_TIMEOUT);
        let Ok(client) = Client::with_options(direct) else {
            continue;
        };
        let Ok(hello) = client
            .database("admin")
            .run_command(doc! { "hello": 1 })
            .await
        else {
            continue;
        };
        if !serves_change_streams(&hello) {
            return Some(Error::NoChangeStreams {
                uri: mask_uri(&config.mongodb.uri),
            });
        }
        let found = hello.get_str("setName").ok();
        if let (Some(expected), Some(found)) = (&expected, found) {
            if expected != found {
                return Some(Error::WrongReplicaSet {
                    uri: mask_uri(&config.mongodb.uri),
                    host: host.to_string(),
                    expected: expected.clone(),
                    found: found.to_string(),
                });
            }
        }
    }
    None
}

async fn parse_options(config: &Config) -> Result<ClientOptions, Error> {
    ClientOptions::parse(&config.mongodb.uri)
        .await
        .map_err(|error| invalid_uri(config, &error))
}

/// Reports a URI the driver cannot use, naming the environment variable when it set the URI.
fn invalid_uri(config: &Config, error: &mongodb::error::Error) -> Error {
    let from_environment =
        Environment::from_process().uri.as_deref() == Some(config.mongodb.uri.as_str());
    let (origin, key) = if from_environment {
        ("the environment".to_string(), ENV_URI)
    } else {
        (config.origin.clone(), "mongodb.uri")
    };
    Error::Config {
        origin,
        problems: vec![format!(
            "`{key}`: `{}` cannot be used: {}",
            mask_uri(&config.mongodb.uri),
            describe(error)
        )],
    }
}
