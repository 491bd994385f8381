//! Child processes that cannot outlive the test binary, and the scratch folders they write to.
//!
//! Every child that the harness starts (mongod, the perfagg daemon, one-shot CLI runs) is
//! spawned by one thread that lives as long as the process and set up with
//! `prctl(PR_SET_PDEATHSIG, SIGKILL)`. Linux sends that signal when the *thread* that forked
//! the child exits, so a test thread that ends or panics cannot kill a server that another
//! test still uses. A test binary that dies in any way, `SIGKILL` included, takes every
//! child with it. Scratch folders live under `target/perfagg-test/`, named after
//! the pid of the test process, so a later run removes the folders of runs that died.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

/// How often the harness polls a child or a log file while it waits.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `command` so that the kernel kills it with `SIGKILL` when this test process exits.
///
/// # Errors
///
/// Returns the error of `Command::spawn`, for example a missing executable.
pub fn spawn_tied_to_test_process(mut command: Command) -> io::Result<Child> {
    let test_pid = std::process::id();
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl and
    // getppid, which are async-signal-safe, and builds its errors without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // If the test process died between fork and prctl, no signal will ever come.
            if libc::getppid() as u32 != test_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let (reply, result) = mpsc::channel();
    spawner()
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the harness spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the harness spawner thread dropped a request"))?
}

/// Returns the channel to the thread that forks every child; it starts the thread once.
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests_tx, requests_rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("perfagg-test-spawner".to_string())
            .spawn(move || {
                // The sender sits in a static that is never dropped, so this loop and the
                // thread end only with the process, which is what PDEATHSIG relies on.
                for request in requests_rx {
                    let SpawnRequest { mut command, reply } = request;
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the harness spawner thread");
        requests_tx
    })
}

/// Sends `signal` to the process `pid`; a process that is already gone is not an error.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let result = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if result != 0 {
        let error = io::Error::last_os_error();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {signal}) failed: {error}"
        );
    }
}

/// Polls `child` until it exits or `timeout` passes; returns `None` on timeout.
pub async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child failed") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Sends `SIGKILL` to `child` and reaps it.
pub fn kill_and_reap(child: &mut Child) -> ExitStatus {
    if let Some(status) = child.try_wait().expect("try_wait on a child failed") {
        return status;
    }
    send_signal(child.id(), libc::SIGKILL);
    child.wait().expect("wait on a killed child failed")
}

/// Returns the last `count` lines of the file at `path`, or a note that it cannot be read.
pub fn file_tail(path: &Path, count: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(count);
            lines[start..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// Returns the folder that contains every scratch folder of the harness: `target/perfagg-test/`.
pub fn harness_root() -> PathBuf {
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target = target_tmp.parent().unwrap_or(target_tmp);
    target.join("perfagg-test")
}

/// Creates a new, empty scratch folder `target/perfagg-test/<pid>-<label>-<n>`.
///
/// The first call in a process also removes the folders of earlier test processes that
/// are no longer running, so servers killed with the test binary leave no data behind
/// beyond the next run.
pub fn scratch_dir(label: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static CLEANUP: Once = Once::new();

    let root = harness_root();
    CLEANUP.call_once(|| remove_stale_dirs(&root));

    let number = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{}-{label}-{number}", std::process::id()));
    fs::create_dir_all(&dir)
        .unwrap_or_else(|error| panic!("cannot create {}: {error}", dir.display()));
    dir
}

/// Removes folders under `root` whose name starts with the pid of a process that is gone.
fn remove_stale_dirs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_running = Path::new("/proc").join(pid.to_string()).exists();
        if !is_running {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes a scratch folder when the current thread is not panicking. Otherwise it keeps
/// the folder and prints its path, so the data and logs of a failed test can be read.
pub fn remove_scratch_dir_unless_panicking(dir: &Path) {
    if std::thread::panicking() {
        eprintln!("kept {} for inspection", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}
