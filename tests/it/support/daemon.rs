//! The perfagg binary under test: [`Daemon`] runs `perfagg run` as a child process with a
//! config file written by the harness, and [`run_cli`] runs one-shot commands.
//!
//! Children get a clean environment as far as perfagg is concerned: every inherited
//! `PERFAGG_*` variable is removed, so a developer's shell settings cannot change a test.
//! The daemon logs JSON at debug level into a file in its scratch folder. When a test panics
//! while a [`Daemon`] is alive, the end of that log goes to stderr and the folder is kept.

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::process::{
    file_tail, kill_and_reap, remove_scratch_dir_unless_panicking, scratch_dir, send_signal,
    spawn_tied_to_test_process, wait_for_exit, POLL_INTERVAL,
};

/// The perfagg binary that cargo built for this test run.
pub const PERFAGG: &str = env!("CARGO_BIN_EXE_perfagg");

/// The daemon logs this message at info level once it has stored its starting position and
/// is watching the staging collections. In JSON logs the message is a quoted string.
const READY_MESSAGE: &str = "\"Ready.\"";

/// How long [`Daemon::terminate`] waits after `SIGTERM`.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`run_cli`] lets a one-shot command run.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// How many log lines a failure message quotes.
const LOG_TAIL_LINES: usize = 60;

/// Settings for starting [`Daemon`]s; one builder can start several daemons in turn, for
/// example to restart after a kill.
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    uri: String,
    database: String,
    /// TOML that the harness completes with `[mongodb] uri` and `database`.
    config: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl DaemonBuilder {
    /// Sets the config file contents. The builder's `[mongodb] uri` and `database` replace
    /// any values the TOML sets for them.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_string();
        self
    }

    /// Sets an environment variable for the daemon, overriding the harness defaults
    /// `PERFAGG_LOG=debug` and `PERFAGG_LOG_FORMAT=json`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Appends a command-line argument after `run --config FILE`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Writes the config file and starts `perfagg run --config FILE`.
    ///
    /// # Panics
    ///
    /// Panics when the TOML is invalid or the binary cannot be started.
    pub fn spawn(&self) -> Daemon {
        let dir = scratch_dir("daemon");
        let config_path = dir.join("perfagg.toml");
        let log_path = dir.join("perfagg.log");
        let config = complete_config(&self.config, &self.uri, &self.database);
        fs::write(&config_path, config)
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", config_path.display()));

        let log = File::create(&log_path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", log_path.display()));
        let log_for_stderr = log
            .try_clone()
            .expect("cannot duplicate the log file handle");

        let mut command = perfagg_command();
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(&self.args)
            .env("PERFAGG_LOG", "debug")
            .env("PERFAGG_LOG_FORMAT", "json")
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        let child = spawn_tied_to_test_process(command)
            .unwrap_or_else(|error| panic!("cannot start {PERFAGG}: {error}"));

        Daemon {
            child,
            dir,
            config_path,
            log_path,
            exit_status: None,
        }
    }
}

/// Parses `toml`, sets `[mongodb] uri` and `database`, and renders it again.
fn complete_config(toml: &str, uri: &str, database: &str) -> String {
    let mut table: toml::Table = toml
        .parse()
        .unwrap_or_else(|error| panic!("the test passed invalid TOML: {error}\n{toml}"));
    let mongodb = table
        .entry("mongodb")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("`mongodb` in a test config must be a table");
    mongodb.insert("uri".to_string(), toml::Value::String(uri.to_string()));
    mongodb.insert(
        "database".to_string(),
        toml::Value::String(database.to_string()),
    );
    toml::to_string(&table).expect("a parsed TOML table renders again")
}

/// Builds a `Command` for the perfagg binary without any inherited `PERFAGG_*` variable.
fn perfagg_command() -> Command {
    let mut command = Command::new(PERFAGG);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PERFAGG_") {
            command.env_remove(&key);
        }
    }
    command
}

/// A running `perfagg run` process. Dropping it kills the process with `SIGKILL`.
pub struct Daemon {
    child: Child,
    /// Scratch folder with the config file and the log; removed on drop unless a test
    /// is panicking.
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Set once the process has been reaped, so later calls return the same status.
    exit_status: Option<ExitStatus>,
}

impl Daemon {
    /// Returns a builder for a daemon on `uri` that merges in `database`.
    pub fn builder(uri: &str, database: &str) -> DaemonBuilder {
        DaemonBuilder {
            uri: uri.to_string(),
            database: database.to_string(),
            config: String::new(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Starts `perfagg run` on `uri` and `database` with the extra settings in
    /// `config_toml` (may be empty).
    pub fn spawn(uri: &str, database: &str, config_toml: &str) -> Daemon {
        Daemon::builder(uri, database).config(config_toml).spawn()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns everything the process has written to stdout and stderr so far.
    pub fn logs(&self) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until the daemon logs "Ready.".
    ///
    /// # Panics
    ///
    /// Panics with the end of the log when the process exits first or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for_log(READY_MESSAGE, timeout).await;
    }

    /// Waits until the log contains `needle`.
    ///
    /// # Panics
    ///
    /// Panics with the end of the log when the process exits first or `timeout` passes.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs().contains(needle) {
                return;
            }
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "perfagg exited ({status}) before logging {needle}; log tail:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "perfagg did not log {needle} within {timeout:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Sends `signal` (for example `libc::SIGTERM`) without waiting.
    pub fn send_signal(&mut self, signal: libc::c_int) {
        if self.try_exit_status().is_none() {
            send_signal(self.pid(), signal);
        }
    }

    /// Sends `SIGTERM` and waits up to 15 seconds for the process to exit.
    ///
    /// # Panics
    ///
    /// Panics with the end of the log, after killing the process, when it does not exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.send_signal(libc::SIGTERM);
        if let Some(status) = self.wait_exit_within(TERMINATE_TIMEOUT).await {
            return status;
        }
        self.kill();
        panic!(
            "perfagg did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM; log tail:\n{}",
            self.log_tail()
        );
    }

    /// Kills the process with `SIGKILL`, as a crash would, and returns its exit status.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exit_status {
            return status;
        }
        let status = kill_and_reap(&mut self.child);
        self.exit_status = Some(status);
        status
    }

    /// Waits for the process to exit on its own.
    ///
    /// # Panics
    ///
    /// Panics with the end of the log when it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_exit_within(timeout).await {
            Some(status) => status,
            None => panic!(
                "perfagg was still running after {timeout:?}; log tail:\n{}",
                self.log_tail()
            ),
        }
    }

    async fn wait_exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit_status {
            return Some(status);
        }
        let status = wait_for_exit(&mut self.child, timeout).await?;
        self.exit_status = Some(status);
        Some(status)
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().expect("try_wait on perfagg failed");
        }
        self.exit_status
    }

    fn log_tail(&self) -> String {
        file_tail(&self.log_path, LOG_TAIL_LINES)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "perfagg log tail ({}):\n{}",
                self.log_path.display(),
                self.log_tail()
            );
        }
        remove_scratch_dir_unless_panicking(&self.dir);
    }
}

/// Runs `perfagg ARGS` to completion with `env` added to a clean environment, and returns
/// its exit status, stdout and stderr.
///
/// # Panics
///
/// Panics when the binary cannot be started or runs longer than 60 seconds.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = scratch_dir("cli");
    let stdout_path = dir.join("stdout");
    let stderr_path = dir.join("stderr");
    let create = |path: &Path| {
        File::create(path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()))
    };

    let mut command = perfagg_command();
    command
        .args(args)
        .envs(
            env.iter()
                .map(|(key, value)| (OsString::from(key), OsString::from(value))),
        )
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));
    let mut child = spawn_tied_to_test_process(command)
        .unwrap_or_else(|error| panic!("cannot start {PERFAGG}: {error}"));

    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on perfagg failed") {
            break status;
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            panic!(
                "perfagg {args:?} did not finish within {CLI_TIMEOUT:?}; stderr tail:\n{}",
                file_tail(&stderr_path, LOG_TAIL_LINES)
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };

    let output = Output {
        status,
        stdout: fs::read(&stdout_path).unwrap_or_default(),
        stderr: fs::read(&stderr_path).unwrap_or_default(),
    };
    remove_scratch_dir_unless_panicking(&dir);
    output
}
