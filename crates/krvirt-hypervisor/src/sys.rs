//! Small Linux process helpers: pidfds, /proc, signals.
//!
//! QEMU runs daemonized, so it is not our child: it cannot be waited for.
//! A pidfd (Linux 5.3+) pins the process identity (no pid-reuse races) and
//! becomes readable when the process exits; without pidfd support we fall
//! back to polling /proc.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Opens a pidfd for `pid`. `Ok(None)` if the kernel has no pidfd_open.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) => Ok(None),
            _ => Err(e),
        };
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Sends `sig` through a pidfd (never hits a recycled pid).
pub(crate) fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: valid pidfd, signal number, NULL siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the process behind a pidfd has exited (pidfd readable).
pub(crate) fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && (p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR)) != 0
}

/// Waits until the process behind the pidfd exits or `timeout` passes.
/// Returns whether it exited.
pub(crate) async fn pidfd_wait(pidfd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    if pidfd_exited(pidfd) {
        return Ok(true);
    }
    // A private duplicate, so concurrent waiters register separately.
    let dup = pidfd.try_clone()?;
    // SAFETY: the AsyncFd owns `dup`, so the fd stays open and refers to
    // the same pidfd for the AsyncFd's whole lifetime.
    let afd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }?;
    match tokio::time::timeout(timeout, afd.readable()).await {
        Ok(Ok(_guard)) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(pidfd_exited(pidfd)),
    }
}

/// Whether `pid` names a live (not zombie) process, from /proc.
pub(crate) fn proc_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => !matches!(state, "Z" | "X" | "x"),
        None => false,
    }
}

/// The arguments of `pid` from /proc/PID/cmdline.
pub(crate) fn proc_cmdline(pid: i32) -> io::Result<Vec<String>> {
    let raw = std::fs::read(PathBuf::from(format!("/proc/{pid}/cmdline")))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Sends `sig` to `pid` by number (fallback when no pidfd exists).
pub(crate) fn kill_pid(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) with a positive pid and a signal number.
    let r = unsafe { libc::kill(pid, sig) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
