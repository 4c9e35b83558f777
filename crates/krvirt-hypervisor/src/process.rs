//! QEMU process lifecycle: launch, re-attach, stop.
//!
//! QEMU runs in a session of its own, as an unprivileged user, inside a
//! per-VM cgroup, under its seccomp sandbox ([`launch_with`]), so a VM
//! outlives the agent that started it. Dropping a [`QemuHandle`] closes the
//! QMP connection and nothing else; a restarted agent finds the VM again
//! with [`reattach`].
//!
//! A re-attached QEMU is not our child, so exit is observed through a
//! pidfd (Linux 5.3+; pid-reuse safe), or by polling /proc where pidfds are
//! unavailable; the same code serves QEMUs we started (which the launching
//! agent reaps in the background).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::argv::{qemu_argv, qmp_chardev};
use crate::cgroup::{CgroupError, Cgroups, VmCgroup};
use crate::config::{ConfigError, Firmware, RunPaths, VmConfig};
use crate::isolation::{self, Access, IsolationError, QemuUser};
use crate::qmp::{QmpClient, QmpError, QmpEvent, QmpOptions};
use crate::sys;

/// How long QEMU may take to initialise before launch gives up.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a launch looks for QEMU's QMP socket: every launch (and a
/// migration target's) waits on it, so a coarse poll is pure latency.
const QMP_POLL: Duration = Duration::from_millis(5);

/// How long QEMU may take to exit after `quit`.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process may take to disappear after SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of QEMU's output kept for error messages.
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
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Isolation(#[from] IsolationError),
    #[error("the config sets CPU or memory limits but no cgroup hierarchy is available")]
    NoCgroups,
    #[error("pinning vCPUs: {0}")]
    Pinning(String),
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
    record: LaunchRecord,
}

/// How QEMU is confined, beyond what the [`VmConfig`] says.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// The account QEMU runs as; `None`: the caller's (root). With a user,
    /// the run directory becomes its (mode 0700), files QEMU writes are
    /// handed to it, files it reads and the directories above them get an
    /// ACL entry for it when needed ([`crate::isolation::grant`]).
    pub user: Option<QemuUser>,
    /// Supplementary groups besides the user's own (e.g. `kvm` for
    /// `/dev/kvm`).
    pub extra_groups: Vec<u32>,
    /// Where the VM's cgroup goes; `None`: no cgroup (refused when the
    /// config asks for limits).
    pub cgroups: Option<Cgroups>,
}

impl LaunchOptions {
    /// The caller's user and this host's cgroups under the default parent
    /// (none if cgroups are unusable here).
    pub fn host_default() -> LaunchOptions {
        LaunchOptions {
            user: None,
            extra_groups: Vec::new(),
            cgroups: Cgroups::host(None).ok(),
        }
    }
}

/// What launch applied, kept in the run directory (`launch.json`) so a
/// re-attached handle knows it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchRecord {
    /// The VM's cgroup.
    #[serde(default)]
    pub cgroup: Option<VmCgroup>,
    /// Host CPUs vCPU threads were pinned to (vCPU order).
    #[serde(default)]
    pub dedicated_cpus: Vec<u32>,
    /// uid / gid QEMU runs as.
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// File in the run directory holding the [`LaunchRecord`].
pub const LAUNCH_RECORD: &str = "launch.json";

/// File in the run directory receiving QEMU's stdout and stderr.
pub const QEMU_LOG: &str = "qemu.log";

/// Starts QEMU for `cfg` with [`LaunchOptions::host_default`].
pub async fn launch(cfg: &VmConfig, qemu_bin: &Path) -> Result<QemuHandle, ProcessError> {
    launch_with(cfg, qemu_bin, &LaunchOptions::host_default()).await
}

/// Starts QEMU for `cfg` and connects to its QMP socket.
///
/// Validates the config, creates the run directory (mode 0700, owned by
/// the QEMU user), creates the VM's cgroup with the config's limits, and
/// starts `qemu_bin` with [`qemu_argv`] in a session of its own: in the
/// child, before `exec`, it joins the cgroup, drops to the QEMU user
/// (`setgroups`/`setgid`/`setuid`), sets `no_new_privs` and marks every
/// inherited descriptor close-on-exec. QEMU is not `-daemonize`d (that
/// fails under `-sandbox` on QEMU 7.2); it outlives the agent anyway (its
/// own session, never killed on drop; the agent only reaps it), and a
/// later agent finds it with [`reattach`]. QEMU's output goes to
/// [`QEMU_LOG`] in the run directory. Ready = its QMP socket answers with a
/// greeting; then vCPU threads are pinned to
/// [`crate::config::Resources::dedicated_cpus`]. On failure the error
/// carries the tail of QEMU's output and nothing is left running.
pub async fn launch_with(
    cfg: &VmConfig,
    qemu_bin: &Path,
    opts: &LaunchOptions,
) -> Result<QemuHandle, ProcessError> {
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
    // The socket's appearance is the readiness signal: no stale one.
    remove_if_exists(&run.qmp_socket)?;
    remove_if_exists(&run.serial_socket)?;

    let (uid, gid) = match &opts.user {
        Some(u) => {
            grant_files(cfg, u)?;
            (u.uid, u.gid)
        }
        None => (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ),
    };

    let vm_name = run
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.name.clone());
    let cgroup = match &opts.cgroups {
        Some(c) => Some(c.create(&vm_name, &cfg.resources)?),
        None if cfg.resources.memory_limit_bytes.is_some()
            || cfg.resources.cpu_limit_millis.is_some() =>
        {
            return Err(ProcessError::NoCgroups);
        }
        None => None,
    };
    let record = LaunchRecord {
        cgroup: cgroup.clone(),
        dedicated_cpus: cfg.resources.dedicated_cpus.clone(),
        uid,
        gid,
    };
    let cleanup_cgroup = |cg: &Option<VmCgroup>| {
        if let Some(cg) = cg {
            let _ = cg.remove(Duration::from_secs(2));
        }
    };

    let log_path = run.dir.join(QEMU_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    if opts.user.is_some() {
        std::os::unix::fs::fchown(&log, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", log_path.display())))?;
    }
    let log_err = log
        .try_clone()
        .map_err(io_err(format!("opening {}", log_path.display())))?;

    let child_setup = ChildSetup::new(
        cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default(),
        opts.user.as_ref().map(|_| {
            let mut groups = vec![gid];
            groups.extend(opts.extra_groups.iter().copied().filter(|g| *g != gid));
            (uid, gid, groups)
        }),
    )?;
    let mut cmd = tokio::process::Command::new(qemu_bin);
    cmd.args(qemu_argv(cfg))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(false);
    // SAFETY: the closure only makes async-signal-safe system calls on
    // memory prepared before the fork (see ChildSetup::run).
    unsafe {
        cmd.pre_exec(move || child_setup.run());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            cleanup_cgroup(&cgroup);
            return Err(ProcessError::Spawn {
                bin: qemu_bin.to_path_buf(),
                source,
            });
        }
    };
    let Some(pid) = child.id().map(|p| p as i32) else {
        cleanup_cgroup(&cgroup);
        return Err(ProcessError::LaunchFailed {
            status: "exited before it could be watched".into(),
            stderr: log_tail(&log_path, log_start),
        });
    };
    // Reap QEMU when it exits while we run; tell launch if that is early.
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = exit_tx.send(status.to_string());
        }
    });
    let pidfd = sys::pidfd_open(pid).ok().flatten();
    let kill_now = |pidfd: Option<OwnedFd>| {
        Unmanaged { pid, pidfd }.kill();
    };

    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    let qmp = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill_now(pidfd);
            cleanup_cgroup(&cgroup);
            return Err(ProcessError::LaunchTimeout {
                after: LAUNCH_TIMEOUT,
                stderr: log_tail(&log_path, log_start),
            });
        }
        let attempt = async {
            if !run.qmp_socket.exists() {
                tokio::time::sleep(QMP_POLL).await;
                return None;
            }
            let opts = QmpOptions {
                greeting_timeout: left,
                ..QmpOptions::default()
            };
            match QmpClient::connect_with(&run.qmp_socket, opts).await {
                Ok(c) => Some(Ok(c)),
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    tokio::time::sleep(QMP_POLL).await;
                    None
                }
                Err(e) => Some(Err(e)),
            }
        };
        tokio::select! {
            status = &mut exit_rx => {
                let status = status.unwrap_or_else(|_| "exited".into());
                cleanup_cgroup(&cgroup);
                // QEMU's own exit notifier removes its pidfile; make sure.
                let _ = remove_if_exists(&run.pidfile);
                return Err(ProcessError::LaunchFailed {
                    status,
                    stderr: log_tail(&log_path, log_start),
                });
            }
            r = attempt => match r {
                None => continue,
                Some(Ok(c)) => break c,
                Some(Err(e)) => {
                    // QEMU listens on QMP before it opens its disks: a
                    // connection it dropped usually means it is exiting
                    // over a bad option. Report that, with its message.
                    if let Ok(status) =
                        tokio::time::timeout(Duration::from_secs(2), &mut exit_rx).await
                    {
                        let status = status.unwrap_or_else(|_| "exited".into());
                        cleanup_cgroup(&cgroup);
                        let _ = remove_if_exists(&run.pidfile);
                        return Err(ProcessError::LaunchFailed {
                            status,
                            stderr: log_tail(&log_path, log_start),
                        });
                    }
                    kill_now(pidfd);
                    cleanup_cgroup(&cgroup);
                    return Err(e.into());
                }
            }
        }
    };
    let handle = QemuHandle {
        pid,
        pidfd,
        paths: run.clone(),
        qmp,
        record,
    };
    let warnings = log_tail(&log_path, log_start);
    if !warnings.is_empty() {
        tracing::warn!(vm = %cfg.name, output = %warnings, "QEMU printed warnings while starting");
    }
    let finish = async {
        if !cfg.resources.dedicated_cpus.is_empty() {
            handle.pin_vcpus(&cfg.resources.dedicated_cpus).await?;
        }
        write_record(&run.dir, &handle.record)
    };
    if let Err(e) = finish.await {
        let _ = handle.kill();
        let _ = handle.wait_exit(KILL_TIMEOUT).await;
        cleanup_cgroup(&cgroup);
        return Err(e);
    }
    Ok(handle)
}

/// Lets `user` open every file and tap `cfg` names, and own the run
/// directory.
fn grant_files(cfg: &VmConfig, user: &QemuUser) -> Result<(), ProcessError> {
    let mut grants: Vec<(&Path, Access)> = vec![(&cfg.run.dir, Access::ReadWrite)];
    let mut keyrings = Vec::new();
    for d in &cfg.disks {
        // librbd reads the Ceph config (and the keyrings it names) as QEMU.
        if let Some(conf) = d.rbd.as_ref().and_then(|r| r.conf.as_ref()) {
            grants.push((conf, Access::Read));
            keyrings.extend(conf_keyrings(conf));
        }
        grants.push((
            &d.path,
            if d.read_only {
                Access::Read
            } else {
                Access::ReadWrite
            },
        ));
        for b in &d.backing {
            grants.push((&b.path, Access::Read));
        }
    }
    if let Some(k) = &cfg.kernel_boot {
        grants.push((&k.kernel, Access::Read));
        if let Some(i) = &k.initrd {
            grants.push((i, Access::Read));
        }
    }
    if let Firmware::Uefi { code, vars } = &cfg.firmware {
        grants.push((code, Access::Read));
        grants.push((vars, Access::ReadWrite));
    }
    // Taps are opened by name: QEMU's user must own them.
    for n in &cfg.nics {
        if let crate::config::NicBackend::Tap { ifname } = &n.backend {
            isolation::set_tap_owner(ifname, user.uid)?;
        }
    }
    for k in &keyrings {
        grants.push((k, Access::Read));
    }
    for (path, access) in grants {
        // A missing file is QEMU's to report (with its own message).
        if !path.exists() {
            continue;
        }
        let changed = isolation::grant(path, user, access)?;
        if !changed.is_empty() {
            tracing::info!(user = %user.name, paths = ?changed, "granted the QEMU user access (ACL)");
        }
    }
    Ok(())
}

/// `keyring = PATH` entries of a Ceph config (absolute paths only).
fn conf_keyrings(conf: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(conf) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let k = k.trim().replace([' ', '-'], "_");
            (k == "keyring").then(|| {
                v.split(',')
                    .map(|p| PathBuf::from(p.trim()))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .filter(|p| p.is_absolute() && p.is_file())
        .collect()
}

fn write_record(dir: &Path, record: &LaunchRecord) -> Result<(), ProcessError> {
    let path = dir.join(LAUNCH_RECORD);
    let text = serde_json::to_vec_pretty(record).map_err(|e| ProcessError::Io {
        context: "encoding the launch record".into(),
        source: io::Error::other(e),
    })?;
    std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// The launch record of a run directory, if it has a sound one. A cgroup
/// directory is only believed if it is named after the run directory
/// (the file lives in a directory QEMU can write).
pub fn read_launch_record(paths: &RunPaths) -> Option<LaunchRecord> {
    let text = std::fs::read(paths.dir.join(LAUNCH_RECORD)).ok()?;
    let mut rec: LaunchRecord = serde_json::from_slice(&text).ok()?;
    let name = paths.dir.file_name()?;
    if let Some(cg) = &rec.cgroup
        && !cg.dirs.iter().all(|d| {
            d.file_name() == Some(name) && d.is_absolute() && !d.to_string_lossy().contains("..")
        })
    {
        rec.cgroup = None;
    }
    if let Some(cg) = &mut rec.cgroup {
        // Parents are only removed when empty; never outside /sys/fs/cgroup.
        cg.parents
            .retain(|p| p.starts_with(crate::cgroup::CGROUP_ROOT));
    }
    Some(rec)
}

/// Removes what a VM left on the host besides its run directory (its
/// cgroup), once its QEMU is gone. Safe to call more than once.
pub fn release(paths: &RunPaths) -> Result<(), ProcessError> {
    if let Some(LaunchRecord {
        cgroup: Some(cg), ..
    }) = read_launch_record(paths)
    {
        cg.remove(Duration::from_secs(5))?;
    }
    Ok(())
}

/// Everything the child does between fork and exec, prepared beforehand
/// (no allocation after the fork).
struct ChildSetup {
    cgroup_procs: Vec<CString>,
    creds: Option<(u32, u32, Vec<libc::gid_t>)>,
}

impl ChildSetup {
    fn new(
        procs: Vec<PathBuf>,
        creds: Option<(u32, u32, Vec<u32>)>,
    ) -> Result<ChildSetup, ProcessError> {
        let cgroup_procs = procs
            .iter()
            .map(|p| {
                CString::new(p.as_os_str().as_bytes()).map_err(|e| ProcessError::Io {
                    context: format!("cgroup path {}", p.display()),
                    source: io::Error::other(e),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ChildSetup {
            cgroup_procs,
            creds,
        })
    }

    /// Runs in the forked child: only async-signal-safe calls.
    fn run(&self) -> io::Result<()> {
        fn check(r: libc::c_long) -> io::Result<()> {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        // SAFETY (whole function): plain system calls on valid pointers
        // to memory owned by `self` or the stack.
        unsafe {
            // Own session: no terminal, no job-control signals of ours.
            check(libc::setsid() as libc::c_long)?;
            // Join the cgroup while still privileged.
            let mut buf = [0u8; 24];
            let pid_text = format_pid(libc::getpid(), &mut buf);
            for path in &self.cgroup_procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd as libc::c_long)?;
                let n = libc::write(fd, pid_text.as_ptr().cast(), pid_text.len());
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(err);
                }
            }
            if let Some((uid, gid, groups)) = &self.creds {
                check(libc::setgroups(groups.len(), groups.as_ptr()) as libc::c_long)?;
                check(libc::setresgid(*gid, *gid, *gid) as libc::c_long)?;
                check(libc::setresuid(*uid, *uid, *uid) as libc::c_long)?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            // Nothing of ours crosses exec except stdio (CLOEXEC rather
            // than close: std's exec-error pipe must stay open).
            let r = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if r < 0 {
                for fd in 3..4096 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
        Ok(())
    }
}

/// Decimal pid into `buf` without allocating.
fn format_pid(pid: libc::pid_t, buf: &mut [u8; 24]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The last [`STDERR_TAIL`] bytes QEMU wrote to its log since `from`.
fn log_tail(path: &Path, from: u64) -> String {
    let Ok(data) = std::fs::read(path) else {
        return String::new();
    };
    let start = (from as usize).min(data.len());
    let new = &data[start..];
    let tail = &new[new.len().saturating_sub(STDERR_TAIL)..];
    String::from_utf8_lossy(tail).trim().to_string()
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
    let Some(handle_probe) = pin_running(paths, expected_marker)? else {
        return Ok(None);
    };
    let pid = handle_probe.pid;
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
        record: read_launch_record(paths).unwrap_or_default(),
    }))
}

/// The live QEMU of `paths` (its pidfile's process, whose command line
/// carries the QMP socket of `paths` and `marker`), pinned through a pidfd
/// before it is checked: no pid-reuse window. `None`: none runs.
fn pin_running(paths: &RunPaths, marker: &str) -> Result<Option<Unmanaged>, ProcessError> {
    if marker.is_empty() {
        return Err(ProcessError::EmptyMarker);
    }
    let pid = match read_pidfile(&paths.pidfile) {
        Ok(Some(pid)) => pid,
        Ok(None) | Err(ProcessError::Pidfile { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(io_err(format!("pidfd_open({pid})"))(e)),
    };
    if !owns_paths(pid, paths, marker) {
        return Ok(None);
    }
    let p = Unmanaged { pid, pidfd };
    Ok(p.is_alive().then_some(p))
}

/// The pid of the QEMU of `paths`, if one runs: found by its pidfile and
/// checked like [`reattach`] (its command line carries the QMP socket of
/// `paths` and `marker`), without connecting to QMP.
pub fn running_pid(paths: &RunPaths, marker: &str) -> Option<u32> {
    if marker.is_empty() {
        return None;
    }
    let pid = read_pidfile(&paths.pidfile).ok()??;
    owns_paths(pid, paths, marker).then_some(pid as u32)
}

/// SIGKILL the QEMU of `paths` if one runs (identified as by
/// [`running_pid`], pinned through a pidfd first: no pid-reuse window),
/// without touching its QMP socket, and wait up to `wait` for it to exit.
/// `Ok(None)`: none ran; `Ok(Some((pid, gone)))`.
pub async fn kill_running(
    paths: &RunPaths,
    marker: &str,
    wait: Duration,
) -> Result<Option<(u32, bool)>, ProcessError> {
    let Some(p) = pin_running(paths, marker)? else {
        return Ok(None);
    };
    let pid = p.pid;
    p.as_ref()
        .signal(libc::SIGKILL)
        .map_err(io_err(format!("kill QEMU pid {pid}")))?;
    let gone = p
        .as_ref()
        .wait_exit(wait)
        .await
        .map_err(io_err(format!("waiting for QEMU pid {pid}")))?;
    Ok(Some((pid as u32, gone)))
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

    /// What launch applied (cgroup, pinning, credentials); for a
    /// re-attached QEMU, what its launch recorded.
    pub fn launch_record(&self) -> &LaunchRecord {
        &self.record
    }

    /// The VM's cgroup, if it has one.
    pub fn cgroup(&self) -> Option<&VmCgroup> {
        self.record.cgroup.as_ref()
    }

    /// `(vCPU index, host thread id)` of every vCPU (`query-cpus-fast`).
    pub async fn vcpu_threads(&self) -> Result<Vec<(u32, i32)>, ProcessError> {
        let v = self.qmp.execute("query-cpus-fast", None).await?;
        let bad = || ProcessError::Qmp(QmpError::Protocol(format!("query-cpus-fast returned {v}")));
        let mut out = Vec::new();
        for c in v.as_array().ok_or_else(bad)? {
            let idx = c
                .get("cpu-index")
                .and_then(|x| x.as_u64())
                .ok_or_else(bad)?;
            let tid = c
                .get("thread-id")
                .and_then(|x| x.as_i64())
                .ok_or_else(bad)?;
            out.push((
                u32::try_from(idx).map_err(|_| bad())?,
                i32::try_from(tid).map_err(|_| bad())?,
            ));
        }
        out.sort();
        Ok(out)
    }

    /// Pins vCPU `i`'s thread to host CPU `cpus[i]`. vCPUs sharing one
    /// thread (single-threaded TCG) get the union of their CPUs.
    pub async fn pin_vcpus(&self, cpus: &[u32]) -> Result<(), ProcessError> {
        let threads = self.vcpu_threads().await?;
        if threads.len() != cpus.len() {
            return Err(ProcessError::Pinning(format!(
                "{} host CPUs for {} vCPUs",
                cpus.len(),
                threads.len()
            )));
        }
        let mut per_thread: std::collections::BTreeMap<i32, BTreeSet<u32>> = Default::default();
        for ((_, tid), cpu) in threads.iter().zip(cpus) {
            per_thread.entry(*tid).or_default().insert(*cpu);
        }
        for (tid, set) in per_thread {
            isolation::pin_thread(tid, &set)?;
        }
        Ok(())
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

    /// [`QemuHandle::graceful_stop`] with explicit timeouts. Once QEMU is
    /// gone its cgroup is removed too.
    pub async fn graceful_stop_with(
        &self,
        grace: Duration,
        opts: StopOptions,
    ) -> Result<StopOutcome, ProcessError> {
        let out = self.stop_inner(grace, opts).await?;
        if let Some(cg) = &self.record.cgroup
            && let Err(e) = cg.remove(Duration::from_secs(5))
        {
            tracing::warn!(pid = self.pid, error = %e, "cgroup of a stopped QEMU not removed");
        }
        Ok(out)
    }

    async fn stop_inner(
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
    fn ceph_conf_keyrings() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("client.keyring");
        std::fs::write(&k, "[client.admin]\n").unwrap();
        let conf = d.path().join("ceph.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nkeyring = /dev/null\n[client]\n  keyring = {}, relative.keyring\n",
                k.display()
            ),
        )
        .unwrap();
        assert_eq!(conf_keyrings(&conf), vec![k]);
        assert!(conf_keyrings(&d.path().join("missing.conf")).is_empty());
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
