//! One mongod process on a loopback port, and the search for the mongod binary.
//!
//! The binary comes from `PERFAGG_TEST_MONGOD`, else `mongod` on `PATH`, else
//! `scripts/install-mongod`, which installs MongoDB 6.0.5 into `.tools/`. A [`Mongod`] owns
//! its scratch folder (data files and `mongod.log`), keeps its port and folder across
//! restarts, and is killed when dropped. `cluster.rs` builds replica sets from it.

use std::env;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{
    file_tail, kill_and_reap, remove_scratch_dir_unless_panicking, scratch_dir, send_signal,
    spawn_tied_to_test_process, wait_for_exit, POLL_INTERVAL,
};

/// Environment variable that names the mongod binary for the tests.
pub const MONGOD_ENV: &str = "PERFAGG_TEST_MONGOD";

/// How long a starting mongod may take to accept TCP connections, with room for recovery
/// after `SIGKILL` on a busy 2-core CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a clean shutdown after `SIGTERM` may take before the test fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How many log lines a failure message quotes.
const LOG_TAIL_LINES: usize = 40;

/// Returns the mongod binary for the tests, installing MongoDB 6.0.5 with
/// `scripts/install-mongod` when neither `PERFAGG_TEST_MONGOD` nor `PATH` provides one.
///
/// # Panics
///
/// Panics with instructions when no mongod can be found or installed; the tests never skip.
pub fn mongod_path() -> PathBuf {
    static MONGOD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match MONGOD.get_or_init(find_mongod) {
        Ok(path) => path.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn find_mongod() -> Result<PathBuf, String> {
    if let Some(value) = env::var_os(MONGOD_ENV).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(value);
        if is_executable_file(&path) {
            return Ok(path);
        }
        return Err(format!(
            "{MONGOD_ENV}={} is not an executable file; point it at a mongod binary \
             (MongoDB 6.0 or later) or unset it",
            path.display()
        ));
    }

    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("mongod"))
            .find(|candidate| is_executable_file(candidate))
    });
    if let Some(path) = on_path {
        return Ok(path);
    }

    install_mongod()
}

fn install_mongod() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-mongod");
    let how_to_fix = format!(
        "set {MONGOD_ENV} to a mongod binary (MongoDB 6.0 or later), put mongod on PATH, \
         or run scripts/install-mongod"
    );

    let output = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| {
            format!(
                "no mongod found and {} could not run: {error}; {how_to_fix}",
                script.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "no mongod found and {} failed ({}):\n{}\n{how_to_fix}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ));
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !is_executable_file(&path) {
        return Err(format!(
            "{} printed {:?}, which is not an executable mongod; {how_to_fix}",
            script.display(),
            path
        ));
    }
    Ok(path)
}

fn is_executable_file(path: &Path) -> bool {
    path.metadata()
        .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Returns a loopback port that was free a moment ago. Another process may take it before
/// mongod binds it, so [`Mongod::start`] retries on "address already in use".
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind a free port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// One mongod process with its own port and scratch folder.
pub struct Mongod {
    port: u16,
    /// Scratch folder with `data/` and `mongod.log`; kept across restarts.
    dir: PathBuf,
    /// Replica set name passed as `--replSet`, or `None` for a standalone server.
    replica_set: Option<String>,
    /// `None` while the server is stopped.
    child: Option<Child>,
}

impl Mongod {
    /// Starts mongod on a free loopback port and waits until it accepts connections.
    /// `label` names its scratch folder; `replica_set` becomes `--replSet`.
    ///
    /// # Panics
    ///
    /// Panics with the end of mongod's log when it exits or does not listen in time.
    pub async fn start(label: &str, replica_set: Option<&str>) -> Mongod {
        const ATTEMPTS: u32 = 3;
        let dir = scratch_dir(label);
        std::fs::create_dir_all(dir.join("data")).expect("cannot create a mongod data folder");

        let mut mongod = Mongod {
            port: free_port(),
            dir,
            replica_set: replica_set.map(str::to_string),
            child: None,
        };
        let mut attempt = 1;
        loop {
            mongod.spawn();
            match mongod.wait_listening().await {
                Ok(()) => return mongod,
                Err(message)
                    if attempt < ATTEMPTS && message.contains("Address already in use") =>
                {
                    attempt += 1;
                    mongod.port = free_port();
                }
                Err(message) => panic!("{message}"),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the host name used in replica set configurations.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("mongod.log")
    }

    /// Returns the last lines of `mongod.log`, for failure messages.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), LOG_TAIL_LINES)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .expect("try_wait on mongod failed")
                .is_none(),
            None => false,
        }
    }

    /// Kills the server with `SIGKILL`, as a crash or power loss would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Stops the server cleanly with `SIGTERM` and waits until it has exited.
    ///
    /// # Panics
    ///
    /// Panics when mongod is still running after 60 seconds.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(child.id(), libc::SIGTERM);
        if wait_for_exit(&mut child, STOP_TIMEOUT).await.is_none() {
            kill_and_reap(&mut child);
            panic!(
                "mongod on port {} did not stop within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                self.port,
                self.log_tail()
            );
        }
    }

    /// Starts the server again on the same port with the same data, stopping it cleanly
    /// first if it is still running.
    ///
    /// # Panics
    ///
    /// Panics when mongod does not come back, for example because another process took
    /// the port meanwhile.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn();
        if let Err(message) = self.wait_listening().await {
            panic!("{message}");
        }
    }

    fn spawn(&mut self) {
        let mongod = mongod_path();
        let mut args: Vec<OsString> = vec![
            "--port".into(),
            self.port.to_string().into(),
            "--bind_ip".into(),
            "127.0.0.1".into(),
            "--dbpath".into(),
            self.dir.join("data").into(),
            "--logpath".into(),
            self.log_path().into(),
            "--logappend".into(),
            // The harness connects over TCP only, so no socket files are left in /tmp.
            "--nounixsocket".into(),
            // Many servers share one machine, and the default cache is half of (RAM - 1 GB).
            "--wiredTigerCacheSizeGB".into(),
            "0.25".into(),
            // Enables the failCommand fail point that fault tests use to inject errors.
            "--setParameter".into(),
            "enableTestCommands=1".into(),
            // Full-time diagnostic data capture only costs CPU and disk here.
            "--setParameter".into(),
            "diagnosticDataCollectionEnabled=false".into(),
            // The TTL monitor removes expired documents every second instead of every 60, so
            // a test of TTL-removed staging documents does not wait a minute. The server
            // reads a new value only after its current sleep, so it must be set at start-up.
            "--setParameter".into(),
            "ttlMonitorSleepSecs=1".into(),
        ];
        if let Some(name) = &self.replica_set {
            args.extend([
                "--replSet".into(),
                name.into(),
                // 990 MB is the minimum, so the oplog cannot be rolled over cheaply in tests.
                "--oplogSize".into(),
                "990".into(),
            ]);
        }

        let mut command = Command::new(&mongod);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied_to_test_process(command)
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", mongod.display()));
        self.child = Some(child);
    }

    /// Waits until the server accepts TCP connections on its port.
    async fn wait_listening(&mut self) -> Result<(), String> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }

            let child = self
                .child
                .as_mut()
                .expect("wait_listening needs a spawned mongod");
            if let Some(status) = child.try_wait().expect("try_wait on mongod failed") {
                self.child = None;
                return Err(format!(
                    "mongod on port {} exited during startup ({status}); log tail:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mongod on port {} did not accept connections within {START_TIMEOUT:?}; \
                     log tail:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Mongod {
    fn drop(&mut self) {
        self.kill();
        remove_scratch_dir_unless_panicking(&self.dir);
    }
}
