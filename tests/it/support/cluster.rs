//! MongoDB deployments for tests: the replica set that the whole test binary shares, private
//! replica sets for tests that stop, kill or restart servers, and standalone servers.
//!
//! All of them are made of [`Mongod`] processes on loopback ports and use the replica set
//! name `rs0`. A replica set is initiated through a direct connection to its first member.
//! Tests then get a new client that discovers the set by name, because a client that
//! connected directly before `replSetInitiate` keeps treating the server as a standalone.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::Client;

use super::mongod::Mongod;
use super::process::POLL_INTERVAL;

/// Replica set name of every set that the harness starts.
pub const REPLICA_SET_NAME: &str = "rs0";

/// How long a new or disturbed replica set may take to have a primary. Starting a
/// three-member set and failing it over took about 5 seconds in the harness self-tests on a
/// 2-core machine, so this leaves a wide margin for a loaded CI machine.
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(60);

/// `settings.electionTimeoutMillis` of private multi-member sets. MongoDB's default of 10 s
/// would make every failover test wait that long; 2 s still leaves room for heartbeats that
/// a busy machine delays.
const ELECTION_TIMEOUT_MS: i64 = 2_000;

/// Connects a client to `uri`.
///
/// # Panics
///
/// Panics when the URI is invalid; the driver connects lazily, so an unreachable server
/// fails the first operation instead.
pub async fn connect(uri: &str) -> Client {
    Client::with_uri_str(uri)
        .await
        .unwrap_or_else(|error| panic!("cannot create a client for {uri}: {error}"))
}

/// Returns a client connected to the single server on `port`, whatever its role.
async fn connect_direct(port: u16) -> Client {
    connect(&format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=2000"
    ))
    .await
}

/// Runs `hello` on the server on `port`; returns `None` when nothing listens there or the
/// command fails.
async fn probe_hello(port: u16) -> Option<Document> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&address, Duration::from_millis(200)).ok()?;
    let client = connect_direct(port).await;
    client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .ok()
}

fn is_writable_primary(hello: &Document) -> bool {
    hello.get_bool("isWritablePrimary").unwrap_or(false)
}

fn is_secondary(hello: &Document) -> bool {
    hello.get_bool("secondary").unwrap_or(false)
}

/// Returns the index of the member on `ports` that reports itself writable primary.
async fn find_primary(ports: &[u16]) -> Option<usize> {
    for (index, port) in ports.iter().enumerate() {
        if let Some(hello) = probe_hello(*port).await {
            if is_writable_primary(&hello) {
                return Some(index);
            }
        }
    }
    None
}

/// Runs `replSetInitiate` on the first member with every member of `members` in the
/// configuration. A set that is already initiated counts as success.
async fn initiate(members: &[Mongod]) -> Result<(), String> {
    let member_configs: Vec<Document> = members
        .iter()
        .enumerate()
        .map(|(index, member)| doc! { "_id": index as i32, "host": member.host() })
        .collect();
    let mut config = doc! { "_id": REPLICA_SET_NAME, "members": member_configs };
    if members.len() > 1 {
        config.insert(
            "settings",
            doc! { "electionTimeoutMillis": ELECTION_TIMEOUT_MS },
        );
    }

    let client = connect_direct(members[0].port()).await;
    let result = client
        .database("admin")
        .run_command(doc! { "replSetInitiate": config })
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(error) if command_error_code(&error) == Some(ALREADY_INITIALIZED) => Ok(()),
        Err(error) => Err(format!(
            "replSetInitiate on port {} failed: {error}; log tail:\n{}",
            members[0].port(),
            members[0].log_tail()
        )),
    }
}

/// Server error code `AlreadyInitialized`.
const ALREADY_INITIALIZED: i32 = 23;

/// Returns the server's error code when `error` is a command error.
pub fn command_error_code(error: &mongodb::error::Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(command_error) => Some(command_error.code),
        _ => None,
    }
}

/// Polls until one of `ports` is writable primary; returns its index.
async fn wait_for_primary_on(ports: &[u16], timeout: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(index) = find_primary(ports).await {
            return Ok(index);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no member on ports {ports:?} became primary within {timeout:?}"
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The single-node replica set that every test in this binary shares; see
/// [`shared_replica_set`]. Tests isolate themselves with [`super::unique_database`].
pub struct SharedReplicaSet {
    uri: String,
    mongod: Mongod,
}

impl SharedReplicaSet {
    /// Connection string with `replicaSet=rs0`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn port(&self) -> u16 {
        self.mongod.port()
    }

    /// Returns the end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.mongod.log_tail()
    }

    /// Connects a new client. Each test needs its own: a client runs background tasks on
    /// the tokio runtime it was created in, and every `#[tokio::test]` has its own runtime.
    pub async fn client(&self) -> Client {
        connect(&self.uri).await
    }
}

/// Returns the replica set shared by all tests of this binary, starting it on first use.
///
/// The set has one member, runs with `enableTestCommands=1` on a free loopback port and
/// keeps its data under `target/perfagg-test/`. It lives until the test process exits; the
/// kernel then kills it (see `process.rs`). The first call blocks for about a second.
///
/// # Panics
///
/// Panics in every test that calls it when the set could not be started.
pub fn shared_replica_set() -> &'static SharedReplicaSet {
    static SHARED: OnceLock<Result<SharedReplicaSet, String>> = OnceLock::new();
    let result = SHARED.get_or_init(|| {
        // Starting the set is async, and this function may be called from inside a test's
        // runtime, which cannot block on another future. A short-lived thread with its own
        // runtime does the work; the mongod it starts does not depend on that thread.
        let starter = std::thread::Builder::new()
            .name("perfagg-test-shared-set".to_string())
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot build a tokio runtime for the shared replica set");
                runtime.block_on(start_shared_replica_set())
            })
            .expect("cannot start a thread for the shared replica set");
        starter
            .join()
            .map_err(|panic| panic_message(panic.as_ref()))
    });
    match result {
        Ok(shared) => shared,
        Err(message) => panic!("the shared replica set failed to start: {message}"),
    }
}

async fn start_shared_replica_set() -> SharedReplicaSet {
    let mongod = Mongod::start("shared-rs", Some(REPLICA_SET_NAME)).await;
    if let Err(message) = initiate(std::slice::from_ref(&mongod)).await {
        panic!("{message}");
    }
    if let Err(message) = wait_for_primary_on(&[mongod.port()], PRIMARY_TIMEOUT).await {
        panic!("{message}; log tail:\n{}", mongod.log_tail());
    }

    // Prove that the URI handed to tests finds the primary by replica set discovery.
    let uri = format!("mongodb://{}/?replicaSet={REPLICA_SET_NAME}", mongod.host());
    let client = connect(&uri).await;
    if let Err(error) = client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
    {
        panic!("ping through {uri} failed: {error}");
    }
    SharedReplicaSet { uri, mongod }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_string()
    } else {
        "(panic without a message)".to_string()
    }
}

/// A replica set owned by one test, for tests that stop, kill or restart servers. Members
/// are numbered from 0 in the order of the replica set configuration. Dropping it kills
/// every member.
pub struct ReplicaSet {
    members: Vec<Mongod>,
}

impl ReplicaSet {
    /// Starts `member_count` members (1 to 7), initiates the set and waits until it has a
    /// primary and every other member is a secondary. Multi-member sets use an election
    /// timeout of 2 seconds.
    ///
    /// # Panics
    ///
    /// Panics with the end of a member's log when the set does not come up within 60 seconds.
    pub async fn start(member_count: usize) -> ReplicaSet {
        assert!(
            (1..=7).contains(&member_count),
            "a replica set has 1 to 7 voting members, not {member_count}"
        );
        let mut members = Vec::with_capacity(member_count);
        for index in 0..member_count {
            members.push(Mongod::start(&format!("rs-member{index}"), Some(REPLICA_SET_NAME)).await);
        }
        if let Err(message) = initiate(&members).await {
            panic!("{message}");
        }

        let set = ReplicaSet { members };
        set.wait_for_primary(PRIMARY_TIMEOUT).await;
        set.wait_for_secondaries(PRIMARY_TIMEOUT).await;
        set
    }

    /// Connection string listing every member, with `replicaSet=rs0`.
    pub fn uri(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(Mongod::host).collect();
        format!(
            "mongodb://{}/?replicaSet={REPLICA_SET_NAME}",
            hosts.join(",")
        )
    }

    /// Connects a new client that follows the primary through elections.
    pub async fn client(&self) -> Client {
        connect(&self.uri()).await
    }

    /// Connects a new client to one member only, whatever its role.
    pub async fn member_client(&self, member: usize) -> Client {
        connect_direct(self.port(member)).await
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn port(&self, member: usize) -> u16 {
        self.member(member).port()
    }

    /// Returns the end of one member's log, for failure messages.
    pub fn log_tail(&self, member: usize) -> String {
        self.member(member).log_tail()
    }

    /// Stops a member cleanly with `SIGTERM`; it keeps its port and data for a restart.
    pub async fn stop_member(&mut self, member: usize) {
        self.member_mut(member).stop().await;
    }

    /// Kills a member with `SIGKILL`; it keeps its port and data for a restart.
    pub fn kill_member(&mut self, member: usize) {
        self.member_mut(member).kill();
    }

    /// Starts a member again on its port with its data, stopping it first if it runs, and
    /// waits until it accepts connections. It may still be recovering or syncing then.
    pub async fn restart_member(&mut self, member: usize) {
        self.member_mut(member).restart().await;
    }

    /// Returns the index of the member that reports itself writable primary right now.
    pub async fn primary(&self) -> Option<usize> {
        find_primary(&self.ports()).await
    }

    /// Waits until some member is writable primary and returns its index.
    ///
    /// # Panics
    ///
    /// Panics with every member's log tail on timeout.
    pub async fn wait_for_primary(&self, timeout: Duration) -> usize {
        match wait_for_primary_on(&self.ports(), timeout).await {
            Ok(index) => index,
            Err(message) => panic!("{message}\n{}", self.all_log_tails()),
        }
    }

    /// Waits until every member is primary or secondary, so none is still starting up or
    /// in initial sync.
    ///
    /// # Panics
    ///
    /// Panics with every member's log tail on timeout.
    pub async fn wait_for_secondaries(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all_ready = true;
            for port in self.ports() {
                let ready = probe_hello(port)
                    .await
                    .is_some_and(|hello| is_writable_primary(&hello) || is_secondary(&hello));
                all_ready &= ready;
            }
            if all_ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "not every member of {} became primary or secondary within {timeout:?}\n{}",
                    self.uri(),
                    self.all_log_tails()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Makes the primary step down (`replSetStepDown` for 60 s, so it cannot be re-elected
    /// at once), waits until another member is primary, and returns that member's index.
    ///
    /// # Panics
    ///
    /// Panics when the set has one member, or no other member becomes primary in 60 s.
    pub async fn step_down_primary(&self) -> usize {
        assert!(
            self.members.len() > 1,
            "stepping down needs a second member to take over"
        );
        let old_primary = self.wait_for_primary(PRIMARY_TIMEOUT).await;
        let client = self.member_client(old_primary).await;
        let result = client
            .database("admin")
            .run_command(doc! { "replSetStepDown": 60, "secondaryCatchUpPeriodSecs": 30 })
            .await;
        if let Err(error) = result {
            panic!(
                "replSetStepDown on member {old_primary} failed: {error}\n{}",
                self.all_log_tails()
            );
        }

        let other_ports: Vec<(usize, u16)> = self
            .ports()
            .into_iter()
            .enumerate()
            .filter(|(index, _)| *index != old_primary)
            .collect();
        let deadline = Instant::now() + PRIMARY_TIMEOUT;
        loop {
            for (index, port) in &other_ports {
                if probe_hello(*port)
                    .await
                    .is_some_and(|hello| is_writable_primary(&hello))
                {
                    return *index;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "no member took over within {PRIMARY_TIMEOUT:?} after member {old_primary} \
                     stepped down\n{}",
                    self.all_log_tails()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.members.iter().map(Mongod::port).collect()
    }

    fn member(&self, member: usize) -> &Mongod {
        self.members.get(member).unwrap_or_else(|| {
            panic!(
                "member {member} does not exist; the set has {}",
                self.members.len()
            )
        })
    }

    fn member_mut(&mut self, member: usize) -> &mut Mongod {
        let count = self.members.len();
        self.members
            .get_mut(member)
            .unwrap_or_else(|| panic!("member {member} does not exist; the set has {count}"))
    }

    fn all_log_tails(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(index, member)| format!("--- member {index} log tail:\n{}", member.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A mongod without `--replSet`, which has no change streams and no transactions.
/// Dropping it kills the server.
pub struct Standalone {
    mongod: Mongod,
}

impl Standalone {
    /// Starts the server and waits until it accepts connections.
    pub async fn start() -> Standalone {
        Standalone {
            mongod: Mongod::start("standalone", None).await,
        }
    }

    pub fn uri(&self) -> String {
        format!("mongodb://{}/", self.mongod.host())
    }

    pub async fn client(&self) -> Client {
        connect(&self.uri()).await
    }

    pub fn port(&self) -> u16 {
        self.mongod.port()
    }
}
