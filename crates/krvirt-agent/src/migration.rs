//! Live migration, host side.
//!
//! The migration controller records a migration in the VMI's
//! `status.migrationState` (source and target host) and labels the VMI
//! with [`TARGET_NODE_LABEL`]. Then, between the two agents:
//!
//! 1. **Target** (this module's watch on VMIs labelled with this host):
//!    prepares the run directory (the guest's disks are hard links to the
//!    source's files: the hosts share a filesystem, so the storage is
//!    shared), starts QEMU with the same `VmConfig` and `-incoming defer`,
//!    sets the migration capabilities, `migrate-incoming tcp:IP:PORT` on
//!    its own address, and publishes `targetNodeAddress` and the port.
//! 2. **Source** (a hook in the agent's reconcile of a running VMI): once
//!    the target is ready, sets `downtime-limit`/bandwidth, writes
//!    `startTimestamp`, `migrate`s to the target and polls `query-migrate`,
//!    reporting progress. On `completed` it moves the VMI to the target in
//!    one status write (`nodeName`, `completed`, times, downtime); its own
//!    QEMU (post-migrate, paused) is then stopped by the ordinary reconcile
//!    because the VMI is no longer bound here. On failure or abort it
//!    records `failed`; the source guest keeps running and the target's
//!    QEMU is removed by the target agent's reconcile.
//!
//! All decisions are pure functions of the VMI status (unit-tested below);
//! writes are compare-and-swap on the VMI's resourceVersion.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_api::event::{NORMAL, WARNING};
use krvirt_api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceStatus};
use krvirt_api::meta::now_rfc3339;
use krvirt_api::migration::{
    AbortStatus, MigrationConfiguration, MigrationMode, MigrationProgress, MigrationState,
    TARGET_NODE_LABEL,
};
use krvirt_client::{ListParams, ResumeOptions};
use krvirt_controller::queue::Key;
use krvirt_hypervisor::{QemuHandle, RunState, launch_with};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::agent::{Agent, AgentError};
use crate::plan::{self, PrepStep};

/// Default `downtime-limit` (ms): the longest pause QEMU may plan for the
/// final switch-over.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 50;
/// Default bandwidth cap (bytes/s): high enough not to limit a veth link.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 10 * 1024 * 1024 * 1024;
/// How often the source polls `query-migrate`.
const POLL: Duration = Duration::from_millis(20);
/// How often the source publishes progress in the VMI status.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Migrations this agent is working on (source or target), by migration uid.
#[derive(Default)]
pub struct Migrations {
    active: Mutex<HashSet<String>>,
}

impl Migrations {
    fn claim(&self, uid: &str) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string())
    }
    fn release(&self, uid: &str) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }
}

// ----- pure decisions ------------------------------------------------------

fn state(vmi: &VirtualMachineInstance) -> Option<&MigrationState> {
    vmi.status.as_ref()?.migration_state.as_ref()
}

/// The uid of a VMI whose QEMU this host is receiving right now: a
/// migration to `me` that has not ended. The agent's reconcile must leave
/// that QEMU alone although the VMI is still bound to the source.
pub fn incoming_uid(vmi: &VirtualMachineInstance, me: &str) -> Option<String> {
    let ms = state(vmi)?;
    (ms.target_node.as_deref() == Some(me) && !ms.is_finished())
        .then(|| vmi.metadata.uid.clone())
        .flatten()
}

/// Should this host (`me`) prepare a migration target for this VMI now?
pub fn target_should_prepare(vmi: &VirtualMachineInstance, me: &str) -> bool {
    let Some(ms) = state(vmi) else {
        return false;
    };
    ms.target_node.as_deref() == Some(me)
        && ms.migration_uid.is_some()
        && ms.target_node_address.is_none()
        && ms.abort_requested != Some(true)
        && !ms.is_finished()
        && vmi.metadata.deletion_timestamp.is_none()
}

/// Should this host (`me`, the VMI's host) start sending now?
pub fn source_should_start(vmi: &VirtualMachineInstance, me: &str) -> bool {
    let Some(ms) = state(vmi) else {
        return false;
    };
    let bound_here = vmi.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(me);
    bound_here
        && ms.source_node.as_deref() == Some(me)
        && ms.target_node_address.is_some()
        && !ms.target_direct_migration_node_ports.is_empty()
        && ms.abort_requested != Some(true)
        && !ms.is_finished()
        && vmi.metadata.deletion_timestamp.is_none()
}

/// The `tcp:IP:PORT` URI of a ready target.
pub fn target_uri(ms: &MigrationState) -> Option<String> {
    let ip: IpAddr = ms.target_node_address.as_deref()?.parse().ok()?;
    let port: u16 = ms
        .target_direct_migration_node_ports
        .keys()
        .next()?
        .parse()
        .ok()?;
    Some(format!("tcp:{}", SocketAddr::new(ip, port)))
}

/// What `query-migrate` says.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Still going (or not started: `none`, `setup`).
    InProgress(MigrationProgress),
    Completed(MigrationProgress),
    Failed(String),
    Cancelled,
}

/// Interpret a `query-migrate` answer.
pub fn read_query_migrate(v: &Value) -> Outcome {
    let ram = &v["ram"];
    let progress = MigrationProgress {
        data_transferred_bytes: ram["transferred"].as_u64(),
        data_remaining_bytes: ram["remaining"].as_u64(),
        data_total_bytes: ram["total"].as_u64(),
        downtime_ms: v["downtime"].as_u64(),
        total_time_ms: v["total-time"].as_u64(),
        iterations: ram["dirty-sync-count"].as_u64(),
    };
    match v["status"].as_str().unwrap_or("none") {
        "completed" => Outcome::Completed(progress),
        "failed" => Outcome::Failed(
            v["error-desc"]
                .as_str()
                .unwrap_or("QEMU reported the migration failed")
                .to_string(),
        ),
        "cancelled" => Outcome::Cancelled,
        _ => Outcome::InProgress(progress),
    }
}

/// QEMU's migration parameters for a configuration.
pub fn qemu_parameters(cfg: &MigrationConfiguration) -> Value {
    let bw = cfg
        .bandwidth_per_migration
        .as_ref()
        .and_then(|q| q.value().ok())
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_MAX_BANDWIDTH);
    json!({
        "downtime-limit": cfg.downtime_limit_ms.unwrap_or(DEFAULT_DOWNTIME_LIMIT_MS),
        "max-bandwidth": bw,
    })
}

/// QEMU's migration capabilities for a configuration (set on both ends).
pub fn qemu_capabilities(cfg: &MigrationConfiguration) -> Value {
    json!([
        {"capability": "auto-converge", "state": cfg.allow_auto_converge == Some(true)},
        {"capability": "postcopy-ram", "state": false},
    ])
}

// ----- status writes -------------------------------------------------------

/// Compare-and-swap update of a VMI's status for migration `mig_uid`.
/// `f` returns false to leave the VMI unchanged (e.g. the migration was
/// replaced or ended). Returns whether a write happened.
async fn update<F>(agent: &Agent, key: &Key, mig_uid: &str, mut f: F) -> Result<bool, AgentError>
where
    F: FnMut(&mut VirtualMachineInstanceStatus) -> bool,
{
    let client = agent.client();
    let kind = agent.vmi_kind();
    for _ in 0..20 {
        let v = match client.get(kind, &key.namespace, &key.name).await {
            Ok(v) => v,
            Err(e) if e.code() == Some(404) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let rv = v
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        let vmi: VirtualMachineInstance =
            serde_json::from_value(v).map_err(|source| AgentError::Decode {
                what: format!("VMI {key}"),
                source,
            })?;
        let mut st = vmi.status.unwrap_or_default();
        let same = st
            .migration_state
            .as_ref()
            .and_then(|m| m.migration_uid.as_deref())
            == Some(mig_uid);
        if !same || !f(&mut st) {
            return Ok(false);
        }
        let body = json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": key.name, "namespace": key.namespace, "resourceVersion": rv},
            "status": st,
        });
        match client
            .replace_status(kind, &key.namespace, &key.name, &body)
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AgentError::Io {
        context: format!("updating the migration state of {key}"),
        source: std::io::Error::other("too many write conflicts"),
    })
}

async fn record_failure(agent: &Agent, key: &Key, mig_uid: &str, reason: &str, aborted: bool) {
    let r = update(agent, key, mig_uid, |st| {
        let Some(ms) = st.migration_state.as_mut() else {
            return false;
        };
        if ms.is_finished() {
            return false;
        }
        ms.failed = Some(true);
        ms.failure_reason = Some(reason.to_string());
        ms.end_timestamp = Some(now_rfc3339());
        if aborted {
            ms.abort_status = Some(AbortStatus::Succeeded);
        }
        true
    })
    .await;
    if let Err(e) = r {
        warn!(%key, error = %e, "cannot record the migration failure");
    }
}

// ----- target --------------------------------------------------------------

/// Watch VMIs whose migration targets this host and prepare targets.
pub async fn run_target_watch(agent: Agent) {
    let params =
        ListParams::all_namespaces().labels(format!("{TARGET_NODE_LABEL}={}", agent.node_name()));
    let mut resync = tokio::time::interval(Duration::from_secs(2));
    loop {
        let mut stream = agent.client().watch_resumable(
            agent.vmi_kind(),
            &params,
            ResumeOptions {
                max_consecutive_failures: u32::MAX,
                ..Default::default()
            },
        );
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => consider_target(&agent, ev.object),
                    Some(Err(e)) => {
                        warn!(error = %e, "migration target watch broke");
                        break;
                    }
                    None => break,
                },
                _ = resync.tick() => {
                    if let Ok(list) = agent.client().list(agent.vmi_kind(), &params).await {
                        for o in list.items {
                            consider_target(&agent, o);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn consider_target(agent: &Agent, obj: Value) {
    let Ok(vmi) = serde_json::from_value::<VirtualMachineInstance>(obj) else {
        return;
    };
    if !target_should_prepare(&vmi, agent.node_name()) {
        return;
    }
    let Some(mig_uid) = state(&vmi).and_then(|m| m.migration_uid.clone()) else {
        return;
    };
    if !agent.migrations().claim(&mig_uid) {
        return;
    }
    let agent = agent.clone();
    tokio::spawn(async move {
        let key = Key::new(vmi.metadata.namespace(), vmi.metadata.name());
        if let Err(why) = prepare_target(&agent, &key, &vmi, &mig_uid).await {
            warn!(%key, %why, "migration target failed");
            agent.record_event(&vmi, WARNING, "MigrationTargetFailed", &why);
            record_failure(&agent, &key, &mig_uid, &why, false).await;
            // Never leave a half-prepared target behind (the VMI may not
            // even record the failure if the write failed).
            if let Some(uid) = vmi.metadata.uid.as_deref() {
                agent.discard(uid).await;
            }
        }
        agent.migrations().release(&mig_uid);
        agent.requeue(key);
    });
}

/// This host's address as seen from the server: the local end of a route
/// to it (the address other hosts on that network reach us at).
pub fn local_address_towards(server_url: &str) -> std::io::Result<IpAddr> {
    let url = url_host_port(server_url)
        .ok_or_else(|| std::io::Error::other(format!("cannot parse server URL {server_url}")))?;
    let addr = url
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{server_url} does not resolve")))?;
    let sock = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    sock.connect(addr)?;
    Ok(sock.local_addr()?.ip())
}

/// The Host's addresses: its name and, when there is a route to the
/// server, the address other hosts reach it at (`InternalIP`, where
/// migration streams arrive).
pub fn host_addresses(node: &str, server_url: &str) -> Vec<krvirt_api::host::HostAddress> {
    let mut v = vec![krvirt_api::host::HostAddress {
        type_: "Hostname".into(),
        address: node.to_string(),
    }];
    if let Ok(ip) = local_address_towards(server_url)
        && !ip.is_unspecified()
    {
        v.push(krvirt_api::host::HostAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    v
}

fn url_host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next()?;
    if hostport.is_empty() {
        return None;
    }
    if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']')
    {
        Some(hostport.to_string())
    } else if url.starts_with("https") {
        Some(format!("{hostport}:443"))
    } else {
        Some(format!("{hostport}:80"))
    }
}

/// Link (or fail: the disks must be on storage both hosts see) the
/// source's disk files into the target's run directory.
fn link_disks(steps: &[PrepStep], source_dir: &Path) -> Result<(), String> {
    for step in steps {
        let path = match step {
            PrepStep::Overlay { path, .. } | PrepStep::Blank { path, .. } => path,
            PrepStep::Seed { path, .. } => path,
        };
        let Some(file) = path.file_name() else {
            return Err(format!("disk path {} has no file name", path.display()));
        };
        let src = source_dir.join(file);
        let _ = std::fs::remove_file(path);
        std::fs::hard_link(&src, path).map_err(|e| {
            format!(
                "the source's disk {} is not on storage this host shares ({e}); \
                 migration with non-shared storage is not implemented yet",
                src.display()
            )
        })?;
    }
    Ok(())
}

async fn prepare_target(
    agent: &Agent,
    key: &Key,
    vmi: &VirtualMachineInstance,
    mig_uid: &str,
) -> Result<(), String> {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let st = vmi.status.clone().unwrap_or_default();
    let ms = st.migration_state.clone().unwrap_or_default();
    let source_dir = st
        .krvirt_runtime
        .as_ref()
        .and_then(|r| r.run_dir.clone())
        .map(PathBuf::from)
        .ok_or("the VMI does not say where its source run directory is")?;
    info!(%key, source = ?ms.source_node, "preparing migration target");
    let run_dir = agent.run_dir_of(&uid);
    let volumes = agent
        .volumes()
        .resolve(vmi)
        .await
        .map_err(|e| format!("volumes: {e:?}"))?;
    let plan = plan::plan_with_volumes(
        vmi,
        agent.accel_kind(),
        &run_dir,
        agent.image_resolver(),
        &volumes,
    )
    .map_err(|e| e.to_string())?;
    agent
        .prepare_run_dir(&run_dir, key, &uid)
        .await
        .map_err(|e| e.to_string())?;
    link_disks(&plan.prep, &source_dir)?;
    let mut config = plan.config.clone();
    // The guest's vCPUs start when the state arrives, as they were.
    config.start_paused = false;
    config.incoming = true;
    let handle = launch_with(&config, agent.qemu_bin(), agent.launch_options())
        .await
        .map_err(|e| format!("starting the target QEMU: {e}"))?;
    let handle = agent.adopt_qemu(key.clone(), uid.clone(), handle);
    let cfg = ms.migration_configuration.clone().unwrap_or_default();
    let qmp = handle.qmp();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": qemu_capabilities(&cfg)})),
    )
    .await
    .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
    let ip = local_address_towards(agent.client().base_url())
        .map_err(|e| format!("finding this host's address: {e}"))?;
    let port = {
        let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("finding a free port on {ip}: {e}"))?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let uri = format!("tcp:{}", SocketAddr::new(ip, port));
    qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .map_err(|e| format!("migrate-incoming {uri}: {e}"))?;
    let wrote = update(agent, key, mig_uid, |st| {
        let Some(ms) = st.migration_state.as_mut() else {
            return false;
        };
        if ms.is_finished() || ms.abort_requested == Some(true) {
            return false;
        }
        ms.target_node_address = Some(ip.to_string());
        ms.target_direct_migration_node_ports = [(port.to_string(), 0)].into_iter().collect();
        true
    })
    .await
    .map_err(|e| e.to_string())?;
    if !wrote {
        return Ok(()); // aborted meanwhile: the reconcile removes the target
    }
    info!(%key, %uri, pid = handle.pid(), "migration target ready");
    // Wait for the state to arrive (QEMU leaves `inmigrate`) or the
    // migration to end otherwise.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !handle.is_alive() {
            return Err("the target QEMU exited while receiving".into());
        }
        match handle.status().await {
            Ok(RunState::Inmigrate) => {}
            Ok(s) => {
                debug!(%key, state = ?s, "target QEMU has the guest");
                return Ok(());
            }
            Err(e) => debug!(%key, error = %e, "target query-status failed"),
        }
        if let Ok(v) = agent
            .client()
            .get(agent.vmi_kind(), &key.namespace, &key.name)
            .await
            && let Ok(vmi) = serde_json::from_value::<VirtualMachineInstance>(v)
            && state(&vmi)
                .is_none_or(|m| m.migration_uid.as_deref() != Some(mig_uid) || m.is_finished())
        {
            return Ok(());
        }
    }
}

// ----- source --------------------------------------------------------------

/// Hook from the agent's reconcile of a VMI running here: start sending
/// when its migration's target is ready.
pub fn maybe_start_source(
    agent: &Agent,
    key: &Key,
    vmi: &VirtualMachineInstance,
    handle: Arc<QemuHandle>,
) {
    if !source_should_start(vmi, agent.node_name()) {
        return;
    }
    let Some(ms) = state(vmi).cloned() else {
        return;
    };
    let Some(mig_uid) = ms.migration_uid.clone() else {
        return;
    };
    if !agent.migrations().claim(&mig_uid) {
        return;
    }
    let (agent, key, vmi) = (agent.clone(), key.clone(), vmi.clone());
    tokio::spawn(async move {
        match run_source(&agent, &key, &ms, &mig_uid, &handle).await {
            Ok(true) => agent.record_event(
                &vmi,
                NORMAL,
                "Migrated",
                &format!(
                    "The VirtualMachineInstance migrated to host {}",
                    ms.target_node.as_deref().unwrap_or_default()
                ),
            ),
            Ok(false) => {}
            Err(why) => {
                warn!(%key, %why, "migration failed");
                agent.record_event(&vmi, WARNING, "MigrationFailed", &why);
                record_failure(&agent, &key, &mig_uid, &why, false).await;
                resume_if_paused(&handle).await;
            }
        }
        agent.migrations().release(&mig_uid);
        agent.requeue(key);
    });
}

async fn resume_if_paused(handle: &QemuHandle) {
    // A failed switch-over can leave the source's vCPUs stopped.
    if let Ok(RunState::Paused | RunState::Postmigrate | RunState::FinishMigrate) =
        handle.status().await
    {
        let _ = handle.resume().await;
    }
}

async fn run_source(
    agent: &Agent,
    key: &Key,
    ms: &MigrationState,
    mig_uid: &str,
    handle: &QemuHandle,
) -> Result<bool, String> {
    let uri = target_uri(ms).ok_or("the target's address is not usable")?;
    let target = ms.target_node.clone().unwrap_or_default();
    let cfg = ms.migration_configuration.clone().unwrap_or_default();
    let qmp = handle.qmp();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": qemu_capabilities(&cfg)})),
    )
    .await
    .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
    qmp.execute("migrate-set-parameters", Some(qemu_parameters(&cfg)))
        .await
        .map_err(|e| format!("migrate-set-parameters: {e}"))?;
    // Claim the start (CAS): an abort that won the race stops us here.
    let started = update(agent, key, mig_uid, |st| {
        let Some(ms) = st.migration_state.as_mut() else {
            return false;
        };
        if ms.is_finished() || ms.abort_requested == Some(true) {
            return false;
        }
        ms.start_timestamp = Some(now_rfc3339());
        ms.mode = Some(MigrationMode::PreCopy);
        true
    })
    .await
    .map_err(|e| e.to_string())?;
    if !started {
        return Ok(false);
    }
    info!(%key, %uri, %target, "migrating");
    let t0 = Instant::now();
    qmp.execute("migrate", Some(json!({"uri": uri})))
        .await
        .map_err(|e| format!("migrate {uri}: {e}"))?;
    let mut last_report = Instant::now();
    let mut cancel_sent = false;
    loop {
        let v = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| format!("query-migrate: {e}"))?;
        match read_query_migrate(&v) {
            Outcome::InProgress(p) => {
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    let mut abort = false;
                    let _ = update(agent, key, mig_uid, |st| {
                        let Some(ms) = st.migration_state.as_mut() else {
                            return false;
                        };
                        abort = ms.abort_requested == Some(true);
                        if abort && ms.abort_status.is_none() {
                            ms.abort_status = Some(AbortStatus::Aborting);
                        }
                        ms.krvirt_progress = Some(p.clone());
                        true
                    })
                    .await;
                    if abort && !cancel_sent {
                        info!(%key, "migration abort requested: migrate_cancel");
                        let _ = qmp.execute("migrate_cancel", None).await;
                        cancel_sent = true;
                    }
                }
            }
            Outcome::Completed(mut p) => {
                if p.total_time_ms.is_none() {
                    p.total_time_ms = Some(t0.elapsed().as_millis() as u64);
                }
                info!(%key, %target, downtime_ms = ?p.downtime_ms, total_ms = ?p.total_time_ms, "migration completed");
                let now = now_rfc3339();
                update(agent, key, mig_uid, |st| {
                    let Some(ms) = st.migration_state.as_mut() else {
                        return false;
                    };
                    ms.completed = Some(true);
                    ms.end_timestamp = Some(now.clone());
                    ms.target_node_domain_detected = Some(true);
                    ms.target_node_domain_ready_timestamp = Some(now.clone());
                    ms.krvirt_progress = Some(p.clone());
                    st.node_name = Some(target.clone());
                    if let Some(rt) = st.krvirt_runtime.as_mut() {
                        rt.pid = None;
                        rt.run_dir = None;
                    }
                    true
                })
                .await
                .map_err(|e| format!("recording the completed migration: {e}"))?;
                return Ok(true);
            }
            Outcome::Failed(why) => return Err(format!("QEMU: {why}")),
            Outcome::Cancelled => {
                record_failure(agent, key, mig_uid, "aborted on request", true).await;
                return Ok(false);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use krvirt_api::kubevirt::VirtualMachineInstance;

    fn vmi(node: &str, ms: MigrationState) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "v", "namespace": "default", "uid": "u1"},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": "Running", "nodeName": node, "migrationState": ms},
        }))
        .unwrap()
    }

    fn scheduled() -> MigrationState {
        MigrationState {
            migration_uid: Some("m1".into()),
            source_node: Some("a".into()),
            target_node: Some("b".into()),
            ..Default::default()
        }
    }

    #[test]
    fn target_prepares_once_and_only_on_its_host() {
        let v = vmi("a", scheduled());
        assert!(target_should_prepare(&v, "b"));
        assert!(!target_should_prepare(&v, "a"));
        let mut ms = scheduled();
        ms.target_node_address = Some("10.0.0.2".into());
        assert!(!target_should_prepare(&vmi("a", ms), "b"));
        let mut ms = scheduled();
        ms.abort_requested = Some(true);
        assert!(!target_should_prepare(&vmi("a", ms), "b"));
    }

    #[test]
    fn source_starts_when_the_target_is_ready_and_not_after_the_end() {
        let mut ms = scheduled();
        assert!(!source_should_start(&vmi("a", ms.clone()), "a"));
        ms.target_node_address = Some("10.0.0.2".into());
        ms.target_direct_migration_node_ports = [("4444".to_string(), 0)].into();
        assert!(source_should_start(&vmi("a", ms.clone()), "a"));
        assert!(!source_should_start(&vmi("a", ms.clone()), "b"));
        assert_eq!(target_uri(&ms).as_deref(), Some("tcp:10.0.0.2:4444"));
        let mut done = ms.clone();
        done.completed = Some(true);
        assert!(!source_should_start(&vmi("a", done), "a"));
        let mut failed = ms.clone();
        failed.failed = Some(true);
        assert!(!source_should_start(&vmi("a", failed), "a"));
        // Already moved: the VMI is bound to the target.
        assert!(!source_should_start(&vmi("b", ms), "a"));
    }

    #[test]
    fn incoming_protects_the_target_qemu_until_the_end() {
        let v = vmi("a", scheduled());
        assert_eq!(incoming_uid(&v, "b").as_deref(), Some("u1"));
        assert_eq!(incoming_uid(&v, "a"), None);
        let mut ms = scheduled();
        ms.failed = Some(true);
        assert_eq!(incoming_uid(&vmi("a", ms), "b"), None);
    }

    #[test]
    fn query_migrate_outcomes() {
        let v =
            json!({"status": "active", "ram": {"transferred": 10, "remaining": 5, "total": 20}});
        match read_query_migrate(&v) {
            Outcome::InProgress(p) => {
                assert_eq!(p.data_transferred_bytes, Some(10));
                assert_eq!(p.data_remaining_bytes, Some(5));
            }
            o => panic!("{o:?}"),
        }
        let v = json!({"status": "completed", "downtime": 12, "total-time": 900, "ram": {}});
        match read_query_migrate(&v) {
            Outcome::Completed(p) => {
                assert_eq!(p.downtime_ms, Some(12));
                assert_eq!(p.total_time_ms, Some(900));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            read_query_migrate(&json!({"status": "failed", "error-desc": "boom"})),
            Outcome::Failed("boom".into())
        );
        assert_eq!(
            read_query_migrate(&json!({"status": "cancelled"})),
            Outcome::Cancelled
        );
    }

    #[test]
    fn parameters_default_to_a_short_downtime_and_open_bandwidth() {
        let p = qemu_parameters(&MigrationConfiguration::default());
        assert_eq!(p["downtime-limit"], DEFAULT_DOWNTIME_LIMIT_MS);
        assert_eq!(p["max-bandwidth"], DEFAULT_MAX_BANDWIDTH);
        let p = qemu_parameters(&MigrationConfiguration {
            bandwidth_per_migration: Some(krvirt_api::quantity::Quantity::new("64Mi")),
            downtime_limit_ms: Some(300),
            ..Default::default()
        });
        assert_eq!(p["max-bandwidth"], 64 * 1024 * 1024);
        assert_eq!(p["downtime-limit"], 300);
    }

    #[test]
    fn server_url_host_port() {
        assert_eq!(
            url_host_port("http://10.1.2.1:8440").as_deref(),
            Some("10.1.2.1:8440")
        );
        assert_eq!(
            url_host_port("https://example.org/x").as_deref(),
            Some("example.org:443")
        );
        let ip = local_address_towards("http://127.0.0.1:9").unwrap();
        assert!(ip.is_loopback());
    }
}
