//! QEMU process lifecycle: launch, re-attach, stop.
//!
//! QEMU runs daemonized (`-daemonize -pidfile`), so a VM outlives the agent
//! that started it. Dropping a [`QemuHandle`] closes the QMP connection and
//! nothing else; a restarted agent finds the VM again with [`reattach`].
//!
//! Because QEMU is not our child it cannot be `wait()`ed for: exit is
//! observed through a pidfd (Linux 5.3+; pid-reuse safe), or by polling
//! /proc where pidfds are unavailable.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::argv::{qemu_argv, qmp_chardev};
use crate::config::{ConfigError, RunPaths, VmConfig};
use crate::qmp::{QmpClient, QmpError, QmpEvent, QmpOptions};
use crate::sys;

/// How long QEMU may take to initialise before launch gives up.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long launch retries connecting to the QMP socket.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long QEMU may take to exit after `quit`.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process may take to disappear after SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of QEMU's stderr kept for error messages.
const STDERR_TAIL: usize = 8 * 1024;

/// Errors of the process module.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: io::Error,
    },
    /// QEMU exited during initialisation; `stderr` holds the tail of what it
    /// printed (its reason).
    #[error("QEMU failed to start ({status}): {stderr}")]
    LaunchFailed { status: String, stderr: String },
    #[error("QEMU did not finish starting within {after:?}: {stderr}")]
    LaunchTimeout { after: Duration, stderr: String },
    #[error("pidfile {path}: {reason}")]
    Pidfile { path: PathBuf, reason: String },
    #[error("QEMU pid {pid} is already running with these run paths")]
    AlreadyRunning { pid: u32 },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU pid {pid} is still alive {after:?} after SIGKILL")]
    Unkillable { pid: u32, after: Duration },
    #[error("reattach needs a non-empty marker (the VMI uid)")]
    EmptyMarker,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ProcessError {
    let context = context.into();
    move |source| ProcessError::Io { context, source }
}

/// QEMU's run state (`query-status`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunState {
    Running,
    Paused,
    /// The guest powered off; QEMU waits (`-no-shutdown`).
    Shutdown,
    /// Started with `-S` and not yet continued.
    Prelaunch,
    Inmigrate,
    Postmigrate,
    FinishMigrate,
    Suspended,
    InternalError,
    IoError,
    GuestPanicked,
    Watchdog,
    Debug,
    SaveVm,
    RestoreVm,
    Colo,
    Other(String),
}

impl RunState {
    /// Maps a QAPI `RunState` name.
    pub fn from_qapi(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "shutdown" => RunState::Shutdown,
            "prelaunch" => RunState::Prelaunch,
            "inmigrate" => RunState::Inmigrate,
            "postmigrate" => RunState::Postmigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "suspended" => RunState::Suspended,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            "guest-panicked" => RunState::GuestPanicked,
            "watchdog" => RunState::Watchdog,
            "debug" => RunState::Debug,
            "save-vm" => RunState::SaveVm,
            "restore-vm" => RunState::RestoreVm,
            "colo" => RunState::Colo,
            other => RunState::Other(other.to_string()),
        }
    }
}

/// How [`QemuHandle::graceful_stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopOutcome {
    /// QEMU exited without being told to (it was gone already, or exited
    /// on its own during the grace period).
    Exited,
    /// The guest shut down (acknowledged the power button, or had already
    /// powered off); QEMU then quit on request.
    GuestShutdown,
    /// The guest did not shut down within the grace period; QEMU quit on
    /// request (`quit`).
    Quit,
    /// QEMU did not exit after `quit`; it was killed with SIGKILL.
    Killed,
}

/// Timeouts of [`QemuHandle::graceful_stop_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// Time QEMU has to exit after `quit` before it is killed.
    pub quit_timeout: Duration,
    /// Time a killed QEMU has to disappear before [`ProcessError::Unkillable`].
    pub kill_timeout: Duration,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            quit_timeout: QUIT_TIMEOUT,
            kill_timeout: KILL_TIMEOUT,
        }
    }
}

/// A running QEMU with an open QMP connection.
#[derive(Debug)]
pub struct QemuHandle {
    pid: i32,
    pidfd: Option<OwnedFd>,
    paths: RunPaths,
    qmp: QmpClient,
}

/// Starts QEMU for `cfg` and connects to its QMP socket.
///
/// Validates the config, creates the run directory (mode 0700), runs
/// `qemu_bin` with [`qemu_argv`], waits for QEMU's daemonizing parent to
/// exit (it does once the VM is initialised, or failed to be), reads the
/// pidfile and connects QMP. On failure the error carries the tail of
/// QEMU's stderr.
pub async fn launch(cfg: &VmConfig, qemu_bin: &Path) -> Result<QemuHandle, ProcessError> {
    cfg.validate()?;
    let run = &cfg.run;
    create_run_dir(&run.dir)?;

    // Never start a second QEMU on the same sockets.
    match read_pidfile(&run.pidfile)? {
        Some(pid) if owns_paths(pid, run, "") => {
            return Err(ProcessError::AlreadyRunning { pid: pid as u32 });
        }
        Some(_) => remove_if_exists(&run.pidfile)?,
        None => {}
    }

    let mut child = tokio::process::Command::new(qemu_bin)
        .args(qemu_argv(cfg))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            bin: qemu_bin.to_path_buf(),
            source,
        })?;
    let stderr_task = child.stderr.take().map(|mut err| {
        tokio::spawn(async move {
            let mut tail = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match err.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tail.extend_from_slice(&chunk[..n]);
                        if tail.len() > STDERR_TAIL {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
            }
            String::from_utf8_lossy(&tail).trim().to_string()
        })
    });
    let stderr = async move {
        match stderr_task {
            Some(t) => tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => String::new(),
        }
    };

    let status = match tokio::time::timeout(LAUNCH_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(io_err("waiting for QEMU to start")(e)),
        Err(_) => {
            let _ = child.start_kill();
            // The daemon may exist already; do not leave it behind.
            if let Ok(Some(pid)) = read_pidfile(&run.pidfile)
                && owns_paths(pid, run, "")
            {
                let _ = sys::kill_pid(pid, libc::SIGKILL);
            }
            return Err(ProcessError::LaunchTimeout {
                after: LAUNCH_TIMEOUT,
                stderr: stderr.await,
            });
        }
    };
    if !status.success() {
        return Err(ProcessError::LaunchFailed {
            status: status.to_string(),
            stderr: stderr.await,
        });
    }
    let warnings = stderr.await;
    if !warnings.is_empty() {
        tracing::warn!(vm = %cfg.name, stderr = %warnings, "QEMU printed warnings while starting");
    }

    let pid = read_pidfile(&run.pidfile)?.ok_or_else(|| ProcessError::Pidfile {
        path: run.pidfile.clone(),
        reason: "QEMU reported success but wrote no pidfile".into(),
    })?;
    let pidfd = sys::pidfd_open(pid).map_err(io_err(format!("pidfd_open({pid})")))?;
    if !owns_paths(pid, run, "") {
        return Err(ProcessError::Pidfile {
            path: run.pidfile.clone(),
            reason: format!("pid {pid} is not the QEMU just started"),
        });
    }
    let qmp = match connect_qmp_retrying(&run.qmp_socket).await {
        Ok(q) => q,
        Err(e) => {
            // We started it and cannot control it: do not leak it.
            Unmanaged { pid, pidfd }.kill();
            return Err(e);
        }
    };
    Ok(QemuHandle {
        pid,
        pidfd,
        paths: run.clone(),
        qmp,
    })
}

/// Finds the QEMU of a VM started earlier (e.g. by a previous agent).
///
/// Returns `Ok(None)` when there is nothing to adopt: no or unreadable
/// pidfile, dead pid, or a process whose command line does not carry both
/// the QMP socket argument of `paths` and `expected_marker` (the agent
/// passes the VMI uid, which is part of the run directory). A foreign
/// process is never adopted. Returns an error if the VM is there but its
/// QMP socket cannot be used (for example another client holds it).
pub async fn reattach(
    paths: &RunPaths,
    expected_marker: &str,
) -> Result<Option<QemuHandle>, ProcessError> {
    if expected_marker.is_empty() {
        return Err(ProcessError::EmptyMarker);
    }
    let pid = match read_pidfile(&paths.pidfile) {
        Ok(Some(pid)) => pid,
        Ok(None) | Err(ProcessError::Pidfile { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Pin the identity first, then check it: no pid-reuse window.
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(io_err(format!("pidfd_open({pid})"))(e)),
    };
    if !owns_paths(pid, paths, expected_marker) {
        return Ok(None);
    }
    let handle_probe = Unmanaged { pid, pidfd };
    if !handle_probe.is_alive() {
        return Ok(None);
    }
    let opts = QmpOptions {
        greeting_timeout: Duration::from_secs(5),
        ..QmpOptions::default()
    };
    let qmp = QmpClient::connect_with(&paths.qmp_socket, opts).await?;
    Ok(Some(QemuHandle {
        pid,
        pidfd: handle_probe.pidfd,
        paths: paths.clone(),
        qmp,
    }))
}

impl QemuHandle {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The QMP connection (clone it to use it from other tasks).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The VM's run paths.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// `query-status`.
    pub async fn status(&self) -> Result<RunState, ProcessError> {
        let v = self.qmp.execute("query-status", None).await?;
        let s = v.get("status").and_then(|s| s.as_str()).ok_or_else(|| {
            ProcessError::Qmp(QmpError::Protocol(format!("query-status returned {v}")))
        })?;
        Ok(RunState::from_qapi(s))
    }

    /// Stops the vCPUs (`stop`).
    pub async fn pause(&self) -> Result<(), ProcessError> {
        self.qmp.execute("stop", None).await?;
        Ok(())
    }

    /// Starts the vCPUs (`cont`).
    pub async fn resume(&self) -> Result<(), ProcessError> {
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// Presses the ACPI power button (`system_powerdown`).
    pub async fn powerdown(&self) -> Result<(), ProcessError> {
        self.qmp.execute("system_powerdown", None).await?;
        Ok(())
    }

    /// Asks QEMU to exit now (`quit`); does not wait for the exit.
    pub async fn quit(&self) -> Result<(), ProcessError> {
        self.quit_within(Duration::from_secs(5)).await
    }

    async fn quit_within(&self, timeout: Duration) -> Result<(), ProcessError> {
        match self.qmp.execute_with_timeout("quit", None, timeout).await {
            // QEMU may close the socket before its reply is read.
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends SIGKILL (through the pidfd when there is one).
    pub fn kill(&self) -> Result<(), ProcessError> {
        self.unmanaged_ref()
            .signal(libc::SIGKILL)
            .map_err(io_err(format!("kill QEMU pid {}", self.pid)))
    }

    /// Whether the QEMU process still exists (a zombie counts as gone).
    pub fn is_alive(&self) -> bool {
        self.unmanaged_ref().is_alive()
    }

    /// Waits up to `timeout` for QEMU to exit; returns whether it did.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<bool, ProcessError> {
        self.unmanaged_ref()
            .wait_exit(timeout)
            .await
            .map_err(io_err(format!("waiting for QEMU pid {}", self.pid)))
    }

    /// Stops the VM, politely first, with the default [`StopOptions`].
    ///
    /// With a non-zero `grace`: presses the power button (unless the guest
    /// is already powered off) and waits up to `grace` for the guest to shut
    /// down (a guest `SHUTDOWN` event or run state `shutdown`). Then `quit`,
    /// and SIGKILL if QEMU has not exited [`StopOptions::quit_timeout`]
    /// later. A zero grace goes straight to `quit`.
    pub async fn graceful_stop(&self, grace: Duration) -> Result<StopOutcome, ProcessError> {
        self.graceful_stop_with(grace, StopOptions::default()).await
    }

    /// [`QemuHandle::graceful_stop`] with explicit timeouts.
    pub async fn graceful_stop_with(
        &self,
        grace: Duration,
        opts: StopOptions,
    ) -> Result<StopOutcome, ProcessError> {
        if !self.is_alive() {
            return Ok(StopOutcome::Exited);
        }
        let mut events = self.qmp.subscribe_events();
        let mut guest_down = false;
        if !grace.is_zero() {
            let deadline = Instant::now() + grace;
            guest_down = self.in_shutdown_state(deadline).await;
            if !guest_down {
                match tokio::time::timeout_at(deadline, self.powerdown()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(pid = self.pid, error = %e, "system_powerdown failed")
                    }
                    Err(_) => tracing::debug!(pid = self.pid, "system_powerdown timed out"),
                }
                guest_down = self.wait_guest_down(&mut events, deadline).await;
            }
        }
        if self.qmp.is_closed() && self.wait_exit(opts.quit_timeout).await? {
            return Ok(if guest_down {
                StopOutcome::GuestShutdown
            } else {
                StopOutcome::Exited
            });
        }
        let quit_deadline = Instant::now() + opts.quit_timeout;
        if let Err(e) = self.quit_within(opts.quit_timeout).await {
            tracing::debug!(pid = self.pid, error = %e, "quit failed");
        }
        let left = quit_deadline.saturating_duration_since(Instant::now());
        if self.wait_exit(left).await? {
            return Ok(if guest_down {
                StopOutcome::GuestShutdown
            } else {
                StopOutcome::Quit
            });
        }
        tracing::warn!(pid = self.pid, "QEMU did not quit; sending SIGKILL");
        self.kill()?;
        if self.wait_exit(opts.kill_timeout).await? {
            Ok(StopOutcome::Killed)
        } else {
            Err(ProcessError::Unkillable {
                pid: self.pid as u32,
                after: opts.kill_timeout,
            })
        }
    }

    /// Whether `query-status` says `shutdown`, answered before `deadline`.
    async fn in_shutdown_state(&self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        matches!(
            self.qmp
                .execute_with_timeout("query-status", None, left)
                .await
                .map(|v| v.get("status").and_then(|s| s.as_str()) == Some("shutdown")),
            Ok(true)
        )
    }

    /// True once the guest powered itself off; false at the deadline, on a
    /// host-initiated shutdown, or when the QMP connection closes.
    async fn wait_guest_down(
        &self,
        events: &mut broadcast::Receiver<QmpEvent>,
        deadline: Instant,
    ) -> bool {
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                ev = events.recv() => match ev {
                    Ok(ev) if ev.event == "SHUTDOWN" => {
                        return ev.data.get("guest").and_then(|g| g.as_bool()).unwrap_or(false);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self.in_shutdown_state(deadline).await {
                            return true;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return false,
                },
                // Belt and braces: the event may have been missed (e.g. the
                // guest powered off while no client was connected).
                _ = poll.tick() => {
                    if self.in_shutdown_state(deadline).await {
                        return true;
                    }
                }
            }
        }
    }

    fn unmanaged_ref(&self) -> UnmanagedRef<'_> {
        UnmanagedRef {
            pid: self.pid,
            pidfd: self.pidfd.as_ref(),
        }
    }
}

/// A process we know by pid (+ pidfd) but hold no QMP connection to.
struct Unmanaged {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

impl Unmanaged {
    fn as_ref(&self) -> UnmanagedRef<'_> {
        UnmanagedRef {
            pid: self.pid,
            pidfd: self.pidfd.as_ref(),
        }
    }

    fn is_alive(&self) -> bool {
        self.as_ref().is_alive()
    }

    fn kill(&self) {
        let _ = self.as_ref().signal(libc::SIGKILL);
    }
}

#[derive(Clone, Copy)]
struct UnmanagedRef<'a> {
    pid: i32,
    pidfd: Option<&'a OwnedFd>,
}

impl UnmanagedRef<'_> {
    fn is_alive(self) -> bool {
        match self.pidfd {
            Some(fd) => !sys::pidfd_exited(fd) && sys::proc_alive(self.pid),
            None => sys::proc_alive(self.pid),
        }
    }

    fn signal(self, sig: i32) -> io::Result<()> {
        let r = match self.pidfd {
            Some(fd) => sys::pidfd_send_signal(fd, sig),
            None => sys::kill_pid(self.pid, sig),
        };
        match r {
            // Already gone.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    async fn wait_exit(self, timeout: Duration) -> io::Result<bool> {
        if let Some(fd) = self.pidfd
            && sys::pidfd_wait(fd, timeout).await?
        {
            return Ok(true);
        }
        // No pidfd, or the pidfd did not fire (the process may linger as a
        // zombie under a parent that does not reap): poll /proc.
        let deadline = Instant::now()
            + if self.pidfd.is_some() {
                Duration::ZERO
            } else {
                timeout
            };
        loop {
            if !sys::proc_alive(self.pid) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether `pid` is alive and its command line carries the QMP socket
/// argument of `paths` and `marker`.
fn owns_paths(pid: i32, paths: &RunPaths, marker: &str) -> bool {
    if !sys::proc_alive(pid) {
        return false;
    }
    let Ok(args) = sys::proc_cmdline(pid) else {
        return false;
    };
    let qmp = qmp_chardev(&paths.qmp_socket);
    args.contains(&qmp) && args.iter().any(|a| a.contains(marker))
}

/// `Ok(None)` if the pidfile does not exist; `Err(Pidfile)` if it does not
/// hold a plausible pid.
fn read_pidfile(path: &Path) -> Result<Option<i32>, ProcessError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(Some(pid)),
        _ => Err(ProcessError::Pidfile {
            path: path.to_path_buf(),
            reason: format!("{:?} is not a process id", text.trim()),
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), ProcessError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

fn create_run_dir(dir: &Path) -> Result<(), ProcessError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    // `recursive` leaves an existing directory's mode alone; tighten it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod 0700 {}", dir.display())))
}

async fn connect_qmp_retrying(path: &Path) -> Result<QmpClient, ProcessError> {
    let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
    loop {
        match QmpClient::connect(path).await {
            Ok(c) => return Ok(c),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_state_names() {
        assert_eq!(RunState::from_qapi("running"), RunState::Running);
        assert_eq!(
            RunState::from_qapi("finish-migrate"),
            RunState::FinishMigrate
        );
        assert_eq!(
            RunState::from_qapi("guest-panicked"),
            RunState::GuestPanicked
        );
        assert_eq!(
            RunState::from_qapi("new-state"),
            RunState::Other("new-state".into())
        );
    }

    #[test]
    fn pidfile_parsing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("qemu.pid");
        assert!(read_pidfile(&p).unwrap().is_none());
        std::fs::write(&p, "1234\n").unwrap();
        assert_eq!(read_pidfile(&p).unwrap(), Some(1234));
        for bad in ["", "abc", "-5", "1", "0"] {
            std::fs::write(&p, bad).unwrap();
            assert!(
                matches!(read_pidfile(&p), Err(ProcessError::Pidfile { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn run_dir_is_private() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("a/b/run");
        create_run_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_run_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
