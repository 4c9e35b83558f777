//! `krvirt fence-watchdog` (hidden): the per-host process `krvirt agent`
//! starts so that guests are fenced even when the agent itself is dead.
//!
//! It outlives the agent (its own process group), watches the agent's
//! `DATA/lease.json` and, once its deadline passes without a newer renewal,
//! SIGKILLs every QEMU under `DATA/run/vmi` and writes the fence records the
//! returning agent reports (krvirt_agent::fence). One per data directory
//! (a lock); it exits once the agent is gone and no guest runs.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use krvirt_agent::fence;

/// `krvirt fence-watchdog`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchdogArgs {
    /// The agent's data directory
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The agent that started it (alive until its first lease file)
    #[arg(long)]
    pub agent_pid: u32,
}

const LOCK: &str = "fence-watchdog.lock";

pub async fn run(args: WatchdogArgs) -> Result<()> {
    let dir = &args.data_dir;
    let path = dir.join(LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        // Another watchdog already guards this host.
        return Ok(());
    }
    eprintln!(
        "krvirt fence-watchdog: guarding the guests under {}",
        dir.display()
    );
    loop {
        let pass = fence::watchdog_pass(dir, Duration::from_millis(500)).await;
        for rec in &pass.killed {
            eprintln!(
                "krvirt fence-watchdog: self-fenced {}/{} (uid {}): the agent's lease was not \
                 renewed for {} ms; killed QEMU pid {}",
                rec.namespace, rec.name, rec.uid, rec.unrenewed_ms, rec.pid
            );
        }
        let lease = fence::read_lease_file(dir);
        let agent_alive = pass.agent_alive || krvirt_agent::fence::pid_alive(args.agent_pid);
        if !agent_alive && !pass.guests_running {
            eprintln!("krvirt fence-watchdog: no agent and no guest left; exiting");
            return Ok(());
        }
        let every = lease
            .map(|l| Duration::from_millis(l.lease_ms.saturating_sub(l.fence_after_ms) / 4))
            .unwrap_or(Duration::from_millis(250))
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        tokio::time::sleep(every).await;
    }
}

/// Start the watchdog of `data_dir` (unless one runs), detached from the
/// agent so that killing the agent leaves it running.
pub fn spawn(data_dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding the krvirt binary")?;
    let mut child = Command::new(exe)
        .arg("fence-watchdog")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--agent-pid", &std::process::id().to_string()])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting krvirt fence-watchdog")?;
    // Reap it if it exits while the agent runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}
