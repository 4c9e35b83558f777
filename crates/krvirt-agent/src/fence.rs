//! Self-fencing: an agent that is alive but cannot renew its lease kills
//! its guests before the server restarts them elsewhere.
//!
//! The server fences a host's VMIs (and its VMs restart on another host)
//! only once the host's `heartbeatTime` is older than the lease
//! (`KRVIRT_HOST_LEASE_SECONDS`, krvirt_controller::hostlife). The agent
//! reads the same setting and keeps a [`LeaseClock`]: the monotonic instant
//! at which it stamped the last `heartbeatTime` the server accepted. Once
//! that is [`krvirt_controller::hostlife::self_fence_after`] ago (the lease
//! minus a margin), it SIGKILLs every QEMU it runs, writes a
//! [`FenceRecord`] per guest under `{data_dir}/fenced/`, and refuses to
//! start guests until a renewal succeeds again. Back in touch, it reports
//! each record (a `SelfFenced` Warning event on the VMI, and the VMI
//! `Failed`/`SelfFenced` if the server has not fenced it yet) and removes
//! it. The records survive an agent restart.
//!
//! An agent that is dead cannot fence anything itself. For that case
//! `krvirt agent` starts a per-host watchdog process (`krvirt
//! fence-watchdog`, which outlives the agent): after each renewal the agent
//! writes `{data_dir}/lease.json` (its pid and the fencing deadline on
//! CLOCK_BOOTTIME); once that deadline passes without a newer file, the
//! watchdog SIGKILLs every QEMU under `{data_dir}/run/vmi` (identified by
//! pidfile and command line, never through QMP) and writes the same
//! [`FenceRecord`]s, which the returning agent reports. Without the
//! watchdog (or when the whole host is hung) only the returning agent's
//! check (a VMI under that name with another uid, or bound elsewhere,
//! stops the stale QEMU before anything else) protects.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// VMI status reason (and event reason) of a guest its own agent killed
/// because it could not renew its host's lease.
pub const REASON_SELF_FENCED: &str = "SelfFenced";

/// When the lease was last renewed, and what follows from it.
#[derive(Debug)]
pub struct LeaseClock {
    last: Mutex<Instant>,
    lease: Duration,
    fence_after: Duration,
}

impl LeaseClock {
    /// A clock for a server-side lease of `lease`, counting as renewed now.
    pub fn new(lease: Duration) -> LeaseClock {
        LeaseClock {
            last: Mutex::new(Instant::now()),
            lease,
            fence_after: krvirt_controller::hostlife::self_fence_after(lease),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server accepted a `heartbeatTime` stamped at `stamped` (taken
    /// BEFORE the timestamp was written into the request, so the agent's
    /// deadline never falls after the server's).
    pub fn renewed(&self, stamped: Instant) {
        let mut last = self.last();
        if stamped > *last {
            *last = stamped;
        }
    }

    /// How long since the last accepted renewal was stamped.
    pub fn unrenewed_for(&self) -> Duration {
        self.unrenewed_at(Instant::now())
    }

    fn unrenewed_at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last())
    }

    /// Whether the guests may run (and start): the lease was renewed less
    /// than [`LeaseClock::fence_after`] ago.
    pub fn fresh(&self) -> bool {
        self.fresh_at(Instant::now())
    }

    fn fresh_at(&self, now: Instant) -> bool {
        self.unrenewed_at(now) < self.fence_after
    }

    /// The lease file describing this clock now (for the watchdog).
    pub fn lease_file(&self) -> LeaseFile {
        let deadline = (boottime_ms() + self.fence_after.as_millis() as u64)
            .saturating_sub(self.unrenewed_for().as_millis() as u64);
        LeaseFile {
            agent_pid: std::process::id(),
            deadline_boottime_ms: deadline,
            fence_after_ms: self.fence_after.as_millis() as u64,
            lease_ms: self.lease.as_millis() as u64,
        }
    }

    /// The server-side lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Without renewal for this long, the guests are killed.
    pub fn fence_after(&self) -> Duration {
        self.fence_after
    }

    /// How often the watchdog looks (a quarter of the margin, ≤ 1 s).
    pub fn check_every(&self) -> Duration {
        ((self.lease - self.fence_after) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// How long the watchdog waits for a killed QEMU to be gone.
    pub fn kill_wait(&self) -> Duration {
        ((self.lease - self.fence_after) / 4).max(Duration::from_millis(50))
    }

    /// The heartbeat period: the configured one, but at least three whole
    /// attempts fail before the fencing bound (a healthy agent never fences).
    pub fn heartbeat_every(&self, configured: Duration) -> Duration {
        configured
            .min(self.fence_after / 4)
            .max(Duration::from_millis(10))
    }

    /// Bound of one renewal attempt, so a request stuck on a dead link
    /// does not delay the next one past the fencing bound.
    pub fn attempt_timeout(&self) -> Duration {
        (self.fence_after / 2).max(Duration::from_millis(100))
    }
}

/// What the agent remembers about a guest it killed to fence itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FenceRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The killed QEMU's pid.
    pub pid: u32,
    /// When it was killed (RFC 3339, this host's clock).
    pub killed_at: String,
    /// How long the lease had not been renewed then.
    pub unrenewed_ms: u64,
    /// The fencing bound and the lease in force.
    pub fence_after_ms: u64,
    pub lease_ms: u64,
}

impl FenceRecord {
    /// The message of the event and status condition.
    pub fn message(&self, node: &str) -> String {
        format!(
            "host {node} could not renew its lease for {:.1} s (the server restarts VMs after \
             {:.1} s): its agent killed this guest's QEMU (pid {}) at {} so that the VM never \
             runs twice",
            self.unrenewed_ms as f64 / 1000.0,
            self.lease_ms as f64 / 1000.0,
            self.pid,
            self.killed_at
        )
    }
}

/// `{data_dir}/lease.json`: what the watchdog process needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseFile {
    /// The agent that renews the lease.
    pub agent_pid: u32,
    /// CLOCK_BOOTTIME (ms) at which the guests must be dead if no newer
    /// renewal was written.
    pub deadline_boottime_ms: u64,
    pub fence_after_ms: u64,
    pub lease_ms: u64,
}

const LEASE_FILE: &str = "lease.json";

/// CLOCK_BOOTTIME in milliseconds (counts suspended time, as the server's
/// clock does; never jumps).
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Write the lease file atomically (no fsync: after a host crash nothing
/// runs to fence).
pub fn write_lease_file(data_dir: &Path, lease: &LeaseFile) -> std::io::Result<()> {
    let path = data_dir.join(LEASE_FILE);
    let tmp = data_dir.join(format!("{LEASE_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(lease).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

pub fn read_lease_file(data_dir: &Path) -> Option<LeaseFile> {
    serde_json::from_slice(&std::fs::read(data_dir.join(LEASE_FILE)).ok()?).ok()
}

/// The identity of a run directory (`vmi.json`, written by the agent).
#[derive(Debug, Deserialize)]
struct RunIdentity {
    namespace: String,
    name: String,
    uid: String,
}

/// What one watchdog pass saw and did.
#[derive(Debug, Default)]
pub struct WatchdogPass {
    /// Guests killed in this pass.
    pub killed: Vec<FenceRecord>,
    /// Whether any guest QEMU still runs here.
    pub guests_running: bool,
    /// Whether the agent named in the lease file is alive.
    pub agent_alive: bool,
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// One look of the watchdog: if the lease file's deadline has passed,
/// kill every guest under `{data_dir}/run/vmi` and record it.
pub async fn watchdog_pass(data_dir: &Path, kill_wait: Duration) -> WatchdogPass {
    let lease = read_lease_file(data_dir);
    let expired = lease
        .as_ref()
        .is_some_and(|l| boottime_ms() >= l.deadline_boottime_ms);
    let mut pass = WatchdogPass {
        agent_alive: lease.as_ref().is_some_and(|l| pid_alive(l.agent_pid)),
        ..Default::default()
    };
    let Ok(entries) = std::fs::read_dir(data_dir.join("run").join("vmi")) else {
        return pass;
    };
    for e in entries.flatten() {
        let Some(id) = std::fs::read(e.path().join("vmi.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<RunIdentity>(&b).ok())
        else {
            continue;
        };
        let paths = krvirt_hypervisor::RunPaths::in_dir(e.path());
        if !expired {
            pass.guests_running |= krvirt_hypervisor::running_pid(&paths, &id.uid).is_some();
            continue;
        }
        match krvirt_hypervisor::kill_running(&paths, &id.uid, kill_wait).await {
            Ok(Some((pid, gone))) => {
                pass.guests_running |= !gone;
                let Some(l) = &lease else { continue };
                let unrenewed = boottime_ms()
                    .saturating_sub(l.deadline_boottime_ms.saturating_sub(l.fence_after_ms));
                let rec = FenceRecord {
                    namespace: id.namespace,
                    name: id.name,
                    uid: id.uid,
                    pid,
                    killed_at: krvirt_api::meta::now_rfc3339(),
                    unrenewed_ms: unrenewed,
                    fence_after_ms: l.fence_after_ms,
                    lease_ms: l.lease_ms,
                };
                if let Err(e) = write_record(data_dir, &rec) {
                    tracing::warn!(uid = %rec.uid, error = %e, "fence record not written");
                }
                pass.killed.push(rec);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(uid = %id.uid, error = %e, "watchdog: cannot kill QEMU");
                pass.guests_running = true;
            }
        }
    }
    pass
}

/// Where the records live.
pub fn record_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("fenced")
}

fn record_path(data_dir: &Path, uid: &str) -> PathBuf {
    record_dir(data_dir).join(format!("{uid}.json"))
}

/// Write a record durably (a crash after the kill must not lose it).
pub fn write_record(data_dir: &Path, rec: &FenceRecord) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(record_dir(data_dir))?;
    let path = record_path(data_dir, &rec.uid);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Every record on disk.
pub fn records(data_dir: &Path) -> Vec<FenceRecord> {
    let Ok(entries) = std::fs::read_dir(record_dir(data_dir)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

/// The record of one VMI uid, if it was fenced here.
pub fn record_of(data_dir: &Path, uid: &str) -> Option<FenceRecord> {
    serde_json::from_slice(&std::fs::read(record_path(data_dir, uid)).ok()?).ok()
}

/// Forget a reported record.
pub fn remove_record(data_dir: &Path, uid: &str) {
    let _ = std::fs::remove_file(record_path(data_dir, uid));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_fences_only_after_the_bound_and_renewals_reset_it() {
        let c = LeaseClock::new(Duration::from_secs(4));
        let t0 = *c.last();
        let ms = Duration::from_millis;
        assert_eq!(c.fence_after(), Duration::from_secs(3));
        assert!(c.fresh_at(t0));
        assert!(c.fresh_at(t0 + ms(2999)));
        assert!(!c.fresh_at(t0 + ms(3000)));
        // A renewal stamped at 2.9 s moves the bound to 5.9 s; an older
        // stamp (a late answer to an earlier attempt) changes nothing.
        c.renewed(t0 + ms(2900));
        c.renewed(t0 + ms(100));
        assert!(c.fresh_at(t0 + ms(5899)));
        assert!(!c.fresh_at(t0 + ms(5900)));
        assert_eq!(c.unrenewed_at(t0 + ms(3900)), ms(1000));
        // Three whole heartbeats fit in the bound, whatever is configured.
        assert_eq!(c.heartbeat_every(Duration::from_secs(10)), ms(750));
        assert_eq!(c.heartbeat_every(ms(500)), ms(500));
        // Watchdog look + kill wait stay inside the margin.
        assert!(c.fence_after() + c.check_every() + c.kill_wait() < c.lease());
    }

    #[test]
    fn records_round_trip_on_disk() {
        let d = tempfile::tempdir().unwrap();
        assert!(records(d.path()).is_empty());
        let r = FenceRecord {
            namespace: "default".into(),
            name: "ha".into(),
            uid: "u1".into(),
            pid: 42,
            killed_at: "2026-01-01T00:00:00Z".into(),
            unrenewed_ms: 3100,
            fence_after_ms: 3000,
            lease_ms: 4000,
        };
        write_record(d.path(), &r).unwrap();
        assert_eq!(records(d.path()), vec![r.clone()]);
        assert_eq!(record_of(d.path(), "u1"), Some(r.clone()));
        assert!(r.message("h0").contains("pid 42"));
        remove_record(d.path(), "u1");
        assert!(records(d.path()).is_empty());
        assert_eq!(record_of(d.path(), "u1"), None);
    }

    #[tokio::test]
    async fn the_watchdog_kills_only_when_the_deadline_passed_and_only_qemu_of_the_run_dir() {
        let d = tempfile::tempdir().unwrap();
        // No lease file, no run dir: nothing to do, no agent known.
        let p = watchdog_pass(d.path(), Duration::from_millis(100)).await;
        assert!(p.killed.is_empty() && !p.guests_running && !p.agent_alive);

        // A run dir whose pidfile names a process that is not its QEMU
        // (pid reuse, a stale file): never killed, even after the deadline.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let run = d.path().join("run/vmi/u1");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("vmi.json"),
            r#"{"namespace":"default","name":"a","uid":"u1"}"#,
        )
        .unwrap();
        std::fs::write(run.join("qemu.pid"), other.id().to_string()).unwrap();
        let fresh = LeaseClock::new(Duration::from_secs(4)).lease_file();
        assert!(fresh.deadline_boottime_ms > boottime_ms());
        assert_eq!(fresh.agent_pid, std::process::id());
        write_lease_file(d.path(), &fresh).unwrap();
        assert_eq!(read_lease_file(d.path()), Some(fresh.clone()));
        let p = watchdog_pass(d.path(), Duration::from_millis(100)).await;
        assert!(p.agent_alive, "this process wrote the lease file");
        assert!(p.killed.is_empty() && !p.guests_running);
        let expired = LeaseFile {
            deadline_boottime_ms: boottime_ms() - 1,
            ..fresh
        };
        write_lease_file(d.path(), &expired).unwrap();
        let p = watchdog_pass(d.path(), Duration::from_millis(100)).await;
        assert!(p.killed.is_empty(), "{:?}", p.killed);
        assert!(records(d.path()).is_empty());
        assert!(
            other.try_wait().unwrap().is_none(),
            "a foreign process was killed"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
