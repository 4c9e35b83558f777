//! Live migration, host side.
//!
//! The migration controller records a migration in the VMI's
//! `status.migrationState` (source and target host) and labels the VMI
//! with [`TARGET_NODE_LABEL`]. Then, between the two agents:
//!
//! 1. **Target** (this module's watch on VMIs labelled with this host):
//!    pulls missing images, prepares its own run directory (empty overlays
//!    on the same base images, blanks of the same size, the cloud-init seed
//!    written again), starts QEMU with the same `VmConfig` and
//!    `incoming` (`-incoming defer`), sets the migration capabilities,
//!    exports the host-local writable disks ([`mirrored_disks`]) over NBD
//!    on its own address, `migrate-incoming tcp:IP:PORT`, and publishes
//!    `targetNodeAddress` and its ports (memory: role 0; NBD:
//!    [`BLOCK_MIGRATION_PORT`]). With mirrored disks QEMU starts paused; once
//!    the state arrived it stops the NBD server and `cont`s.
//! 2. **Source** (a hook in the agent's reconcile of a running VMI): once
//!    the target is ready, sets `downtime-limit`/bandwidth, writes
//!    `startTimestamp`, mirrors the host-local disks into the target's NBD
//!    exports until every job is READY, `migrate`s to the target (with
//!    `pause-before-switchover` when mirroring: at `pre-switchover` the
//!    guest is stopped, the mirror jobs are completed by `block-job-cancel`
//!    and `migrate-continue` sends the device state) and polls
//!    `query-migrate`, reporting progress. On `completed` it moves the VMI
//!    to the target in one status write (`nodeName`, `completed`, times,
//!    downtime); its own QEMU (post-migrate, paused) is then stopped by the
//!    ordinary reconcile because the VMI is no longer bound here. On
//!    failure or abort it cancels its mirror jobs and records `failed`;
//!    the source guest keeps running on its own, unchanged disks and the
//!    target's QEMU is removed by the target agent's reconcile.
//!
//! All decisions are pure functions of the VMI status (unit-tested below);
//! writes are compare-and-swap on the VMI's resourceVersion.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
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
    /// VMI uids whose migration target this host is preparing: the
    /// reconcile's cleanup of a VMI that left this host (the same uid, when
    /// a guest goes back and forth) must not touch their run directory.
    targets: Mutex<HashSet<String>>,
}

impl Migrations {
    fn begin_target(&self, vmi_uid: &str) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vmi_uid.to_string());
    }
    fn end_target(&self, vmi_uid: &str) {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vmi_uid);
    }
    /// Whether a migration target is being prepared here for `vmi_uid`.
    pub fn is_target(&self, vmi_uid: &str) -> bool {
        self.targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(vmi_uid)
    }
    /// Run `f` (a cleanup of `vmi_uid`'s run directory) unless a target
    /// is being prepared for it; atomic with [`Migrations::begin_target`].
    pub fn unless_target(&self, vmi_uid: &str, f: impl FnOnce()) {
        let t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if !t.contains(vmi_uid) {
            f();
        }
    }
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

/// The value that marks, in `targetDirectMigrationNodePorts` (target port
/// → role), the port of the target's NBD server (KubeVirt's
/// `LibvirtBlockMigrationPort`); the memory stream's port is marked 0.
pub const BLOCK_MIGRATION_PORT: i64 = 49153;

fn target_port(ms: &MigrationState, role: i64) -> Option<SocketAddr> {
    let ip: IpAddr = ms.target_node_address.as_deref()?.parse().ok()?;
    let port: u16 = ms
        .target_direct_migration_node_ports
        .iter()
        .find(|(_, r)| **r == role)?
        .0
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port))
}

/// The `tcp:IP:PORT` URI of a ready target.
pub fn target_uri(ms: &MigrationState) -> Option<String> {
    target_port(ms, 0).map(|a| format!("tcp:{a}"))
}

/// Where a ready target's NBD server listens (when it mirrors disks).
pub fn target_nbd(ms: &MigrationState) -> Option<SocketAddr> {
    target_port(ms, BLOCK_MIGRATION_PORT)
}

/// How a host-local disk is copied to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorSync {
    /// Only the top layer (an overlay on a base image the target has too).
    Top,
    /// Everything (a disk with no backing image).
    Full,
}

impl MirrorSync {
    fn qapi(self) -> &'static str {
        match self {
            MirrorSync::Top => "top",
            MirrorSync::Full => "full",
        }
    }
}

/// A disk whose content lives only on the source host (non-shared
/// storage): the target exports an empty equivalent over NBD and the
/// source mirrors into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorDisk {
    /// The disk's format node (`drive{i}-fmt`), on both hosts; also the
    /// NBD export's name.
    pub node: String,
    pub sync: MirrorSync,
}

impl MirrorDisk {
    /// The source's NBD client node and block job for this disk.
    fn job(&self) -> String {
        format!("mig-{}", self.node)
    }
}

/// The disks of a plan that must be mirrored: the writable ones in the
/// VMI's run directory (containerDisk overlays: `top`; emptyDisk blanks:
/// `full`). Read-only disks (the cloud-init seed) are made again on the
/// target; Volumes of shared pools are opened in place, those of
/// host-local pools are added by [`crate::volmove::volume_mirror_disks`].
pub fn mirrored_disks(plan: &plan::Plan) -> Vec<MirrorDisk> {
    plan.config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.read_only && d.rbd.is_none())
        .filter_map(|(i, d)| {
            let sync = plan.prep.iter().find_map(|p| match p {
                PrepStep::Overlay { path, .. } if *path == d.path => Some(MirrorSync::Top),
                PrepStep::Blank { path, .. } if *path == d.path => Some(MirrorSync::Full),
                _ => None,
            })?;
            Some(MirrorDisk {
                node: krvirt_hypervisor::argv::disk_format_node(i),
                sync,
            })
        })
        .collect()
}

/// Progress of the block jobs `jobs` in a `query-block-jobs` answer:
/// (copied, total, every one ready, an error).
pub fn read_block_jobs(v: &Value, jobs: &[String]) -> (u64, u64, bool, Option<String>) {
    let (mut done, mut total, mut ready, mut error) = (0, 0, true, None);
    for j in jobs {
        let Some(job) = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["device"].as_str() == Some(j.as_str()))
        else {
            ready = false;
            error.get_or_insert_with(|| format!("block job {j} is gone"));
            continue;
        };
        done += job["offset"].as_u64().unwrap_or(0);
        total += job["len"].as_u64().unwrap_or(0);
        ready &= job["ready"].as_bool() == Some(true);
        if let Some(e) = job["error"].as_str() {
            error.get_or_insert_with(|| format!("block job {j}: {e}"));
        } else if job["status"].as_str() == Some("concluded") {
            error.get_or_insert_with(|| format!("block job {j} ended early"));
        }
    }
    (done, total, ready, error)
}

/// What `query-migrate` says.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Still going (or not started: `none`, `setup`).
    InProgress(MigrationProgress),
    Completed(MigrationProgress),
    Failed(String),
    Cancelled,
    /// Paused before the switch-over (`pause-before-switchover`): the
    /// guest is stopped; `migrate-continue` sends the device state.
    PreSwitchover,
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
        ..Default::default()
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
        "pre-switchover" => Outcome::PreSwitchover,
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

/// QEMU's migration capabilities for a configuration (set on both ends;
/// `mirror`: the source mirrors disks, so it stops before the switch-over
/// (`pause-before-switchover`) to finish the disk copy while the guest is
/// paused, before the target can run it).
pub fn qemu_capabilities(cfg: &MigrationConfiguration, mirror: bool) -> Value {
    json!([
        {"capability": "auto-converge", "state": cfg.allow_auto_converge == Some(true)},
        {"capability": "postcopy-ram", "state": false},
        {"capability": "pause-before-switchover", "state": mirror},
        {"capability": "events", "state": true},
    ])
}

/// Sleep until a QMP event arrives or `timeout` passes (a closed
/// connection just sleeps: the caller's checks notice QEMU is gone).
async fn wait_event_or(
    events: &mut tokio::sync::broadcast::Receiver<krvirt_hypervisor::QmpEvent>,
    timeout: Duration,
) {
    use tokio::sync::broadcast::error::RecvError;
    tokio::select! {
        ev = events.recv() => {
            if matches!(ev, Err(RecvError::Closed)) {
                tokio::time::sleep(timeout).await;
            }
        }
        _ = tokio::time::sleep(timeout) => {}
    }
}

/// The mirror's speed (bytes/s; 0 = unlimited): the policy's
/// `bandwidthPerMigration` covers disks as well as memory.
pub fn mirror_speed(cfg: &MigrationConfiguration) -> u64 {
    cfg.bandwidth_per_migration
        .as_ref()
        .and_then(|q| q.value().ok())
        .unwrap_or(0)
}

// ----- status writes -------------------------------------------------------

/// Compare-and-swap update of a VMI's status for migration `mig_uid`.
/// `f` returns false to leave the VMI unchanged (e.g. the migration was
/// replaced or ended). Returns whether a write happened.
async fn update<F>(agent: &Agent, key: &Key, mig_uid: &str, mut f: F) -> Result<bool, AgentError>
where
    F: FnMut(&mut VirtualMachineInstanceStatus) -> bool,
{
    let wrote = agent
        .client()
        .modify_status(
            agent.vmi_kind(),
            &key.namespace,
            &key.name,
            |st: &mut VirtualMachineInstanceStatus| {
                let same = st
                    .migration_state
                    .as_ref()
                    .and_then(|m| m.migration_uid.as_deref())
                    == Some(mig_uid);
                same && f(st)
            },
        )
        .await?;
    Ok(wrote)
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
        // A failure after an abort request is that abort's end (the target
        // may notice first that the source cancelled).
        if aborted || ms.abort_requested == Some(true) {
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
        let vmi_uid = vmi.metadata.uid.clone().unwrap_or_default();
        agent.migrations().begin_target(&vmi_uid);
        let r = prepare_target(&agent, &key, &vmi, &mig_uid).await;
        agent.migrations().end_target(&vmi_uid);
        if let Err(why) = r {
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

async fn prepare_target(
    agent: &Agent,
    key: &Key,
    vmi: &VirtualMachineInstance,
    mig_uid: &str,
) -> Result<(), String> {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let st = vmi.status.clone().unwrap_or_default();
    let ms = st.migration_state.clone().unwrap_or_default();
    info!(%key, source = ?ms.source_node, "preparing migration target");
    let run_dir = agent.run_dir_of(&uid);
    // The guest may have just left this host (back and forth): its old,
    // post-migrate QEMU and run directory go first.
    if agent.qemu_of(&uid).is_some() || run_dir.exists() {
        info!(%key, "removing what the guest left here when it migrated away");
        agent.discard(&uid).await;
    }
    // The base images of overlays must be here too (content-addressed: the
    // same digest is the same content the source's overlay sits on).
    agent.ensure_images(vmi).await?;
    // Volumes: shared ones open in place, host-local ones get an empty
    // copy here that the source mirrors into (crate::volmove).
    let (volumes, volume_copies) = agent
        .volumes()
        .resolve_for_target(vmi, mig_uid, ms.source_node.as_deref().unwrap_or_default())
        .await
        .map_err(|e| format!("volumes: {e}"))?;
    let plan = plan::plan_with_volumes(
        vmi,
        agent.accel_kind(),
        &run_dir,
        agent.image_resolver(),
        &volumes,
    )
    .map_err(|e| e.to_string())?;
    // This host's own disks: empty overlays on the same bases and blanks
    // of the same size (filled by the source's block mirror), the
    // cloud-init seed made again from the VMI.
    agent
        .prepare_run_dir(&run_dir, key, &uid, &plan.prep)
        .await
        .map_err(|e| e.to_string())?;
    // The NICs on krvirt Networks: the same taps (named from the VMI uid),
    // MACs and addresses as on the source, on this host's bridges (which
    // join the Networks' VXLAN segments), before QEMU opens them.
    agent
        .host_net()
        .prepare(vmi, &run_dir)
        .await
        .map_err(|e| format!("preparing the network: {e}"))?;
    let mut mirror = mirrored_disks(&plan);
    mirror.extend(crate::volmove::volume_mirror_disks(&plan, &volume_copies));
    let mut config = plan.config.clone();
    // Shared storage: the guest's vCPUs start when the state arrives, as
    // they were. Mirrored disks: QEMU holds the guest paused after the
    // state arrived, until the NBD server (which writes to its disks) is
    // stopped; then this agent lets it run.
    config.start_paused = !mirror.is_empty();
    config.incoming = true;
    let handle = launch_with(&config, agent.qemu_bin(), agent.launch_options())
        .await
        .map_err(|e| format!("starting the target QEMU: {e}"))?;
    let handle = agent.adopt_qemu(key.clone(), uid.clone(), handle);
    let cfg = ms.migration_configuration.clone().unwrap_or_default();
    let qmp = handle.qmp();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": qemu_capabilities(&cfg, false)})),
    )
    .await
    .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
    // MIGRATION events say at once when the state has arrived.
    let mut events = qmp.subscribe_events();
    let ip = local_address_towards(agent.client().base_url())
        .map_err(|e| format!("finding this host's address: {e}"))?;
    let free_port = || -> Result<u16, String> {
        let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("finding a free port on {ip}: {e}"))?;
        Ok(l.local_addr().map_err(|e| e.to_string())?.port())
    };
    let mut ports = std::collections::BTreeMap::new();
    if !mirror.is_empty() {
        let (listener, nbd_port) = nbd_listener(ip)?;
        qmp.execute_with_fd(
            "getfd",
            Some(json!({"fdname": NBD_LISTENER_FD})),
            listener.as_fd(),
        )
        .await
        .map_err(|e| format!("passing the NBD listening socket to QEMU: {e}"))?;
        drop(listener);
        qmp.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "fd", "data": {"str": NBD_LISTENER_FD}}})),
        )
        .await
        .map_err(|e| format!("nbd-server-start on {ip}:{nbd_port}: {e}"))?;
        for d in &mirror {
            qmp.execute(
                "block-export-add",
                Some(json!({"type": "nbd", "id": d.job(), "node-name": d.node,
                    "name": d.node, "writable": true})),
            )
            .await
            .map_err(|e| format!("exporting {} over NBD: {e}", d.node))?;
        }
        info!(%key, disks = mirror.len(), port = nbd_port, "disks exported for the block mirror");
        ports.insert(nbd_port.to_string(), BLOCK_MIGRATION_PORT);
    }
    let port = free_port()?;
    let uri = format!("tcp:{}", SocketAddr::new(ip, port));
    qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
        .await
        .map_err(|e| format!("migrate-incoming {uri}: {e}"))?;
    ports.insert(port.to_string(), 0);
    let wrote = update(agent, key, mig_uid, |st| {
        let Some(ms) = st.migration_state.as_mut() else {
            return false;
        };
        if ms.is_finished() || ms.abort_requested == Some(true) {
            return false;
        }
        ms.target_node_address = Some(ip.to_string());
        ms.target_direct_migration_node_ports = ports.clone();
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
    let user_paused = vmi
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == krvirt_api::kubevirt::vmi_conditions::PAUSED)
        })
        .is_some_and(|c| c.status == krvirt_api::meta::ConditionStatus::True);
    let mut source_done: Option<Instant> = None;
    loop {
        wait_event_or(&mut events, Duration::from_millis(200)).await;
        if !handle.is_alive() {
            return Err("the target QEMU exited while receiving".into());
        }
        match handle.status().await {
            Ok(RunState::Inmigrate) => {}
            Ok(s) => {
                debug!(%key, state = ?s, "target QEMU has the guest");
                if !mirror.is_empty() {
                    // The source finished the disk copy before it sent the
                    // device state: the NBD server goes before the guest
                    // runs (the guest's disks are its own again).
                    if let Err(e) = qmp.execute("nbd-server-stop", None).await {
                        warn!(%key, error = %e, "nbd-server-stop on the migration target");
                    }
                    if !user_paused && matches!(s, RunState::Paused | RunState::Prelaunch) {
                        handle
                            .resume()
                            .await
                            .map_err(|e| format!("cont on the target: {e}"))?;
                    }
                }
                return Ok(());
            }
            Err(e) => debug!(%key, error = %e, "target query-status failed"),
        }
        if let Some(t) = source_done {
            // The source has sent everything; QEMU here is still loading it.
            if t.elapsed() > Duration::from_secs(120) {
                return Err("the target QEMU did not take the guest's state".into());
            }
            continue;
        }
        if let Ok(v) = agent
            .client()
            .get(agent.vmi_kind(), &key.namespace, &key.name)
            .await
            && let Ok(vmi) = serde_json::from_value::<VirtualMachineInstance>(v)
        {
            match state(&vmi) {
                Some(m) if m.migration_uid.as_deref() == Some(mig_uid) => {
                    if m.completed == Some(true) {
                        // Completed on the source: the guest still needs
                        // this loop (NBD server stopped, `cont`).
                        source_done = Some(Instant::now());
                    } else if m.is_finished() {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
        }
    }
}

/// Name of the target's NBD listening socket in its QEMU (`getfd`).
const NBD_LISTENER_FD: &str = "krvirt-nbd-listener";

/// The target's NBD listening socket, on `ip` and a free port, with
/// TCP_NODELAY set: accepted connections inherit it, so the NBD handshake's
/// small replies are not held back by Nagle's algorithm until the client's
/// delayed ACK. QEMU's own inet listener does not set it, and the source's
/// `blockdev-add` of the export then takes ~90 ms (~2 ms with it), measured
/// between two QEMU 7.2 processes on loopback.
fn nbd_listener(ip: IpAddr) -> Result<(std::net::TcpListener, u16), String> {
    let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| format!("listening for NBD on {ip}: {e}"))?;
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::TcpNoDelay, &true)
        .map_err(|e| format!("TCP_NODELAY on the NBD listening socket: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    Ok((l, port))
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
        match run_source(&agent, &key, &vmi, &ms, &mig_uid, &handle).await {
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

/// The disks this source must mirror to the target: the same plan the
/// target made, on this host's run directory.
async fn source_mirror_set(
    agent: &Agent,
    vmi: &VirtualMachineInstance,
    mig_uid: &str,
) -> Result<Vec<MirrorDisk>, String> {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let volumes = agent
        .volumes()
        .resolve(vmi)
        .await
        .map_err(|e| format!("volumes: {e:?}"))?;
    let plan = plan::plan_with_volumes(
        vmi,
        agent.accel_kind(),
        &agent.run_dir_of(&uid),
        agent.image_resolver(),
        &volumes,
    )
    .map_err(|e| e.to_string())?;
    let mut disks = mirrored_disks(&plan);
    // Host-local Volumes the target made a copy of (crate::volmove).
    let copies = agent.volumes().source_copies(vmi, mig_uid).await?;
    disks.extend(crate::volmove::volume_mirror_disks(&plan, &copies));
    Ok(disks)
}

/// Start the block mirror of every disk in `disks` into the target's NBD
/// exports at `nbd` (a client node and a job `mig-{node}` per disk).
async fn start_mirror(
    qmp: &krvirt_hypervisor::QmpClient,
    disks: &[MirrorDisk],
    nbd: SocketAddr,
    speed: u64,
) -> Result<(), String> {
    for d in disks {
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "nbd", "node-name": d.job(), "export": d.node,
                "server": {"type": "inet", "host": nbd.ip().to_string(),
                           "port": nbd.port().to_string()},
            })),
        )
        .await
        .map_err(|e| format!("connecting to the target's NBD export {}: {e}", d.node))?;
        let mut args = json!({
            "job-id": d.job(), "device": d.node, "target": d.job(),
            "sync": d.sync.qapi(), "auto-dismiss": false,
        });
        if speed > 0 {
            args["speed"] = json!(speed);
        }
        qmp.execute("blockdev-mirror", Some(args))
            .await
            .map_err(|e| format!("blockdev-mirror {}: {e}", d.node))?;
    }
    Ok(())
}

/// End the mirror jobs of `disks` and remove their NBD client nodes.
/// `consistent`: the guest is paused and every job READY, so cancelling
/// completes each copy (QEMU copies what is still dirty first); errors
/// say the target's disks are not a faithful copy. Otherwise (a failure or
/// an abort) the jobs are cancelled at once and errors are ignored; the
/// source's own disks are never touched by a mirror.
async fn end_mirror(
    qmp: &krvirt_hypervisor::QmpClient,
    disks: &[MirrorDisk],
    consistent: bool,
) -> Result<(), String> {
    let jobs: Vec<String> = disks.iter().map(MirrorDisk::job).collect();
    for j in &jobs {
        let r = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": j, "force": !consistent})),
            )
            .await;
        if let Err(e) = r
            && consistent
        {
            return Err(format!("block-job-cancel {j}: {e}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(if consistent { 60 } else { 10 });
    let mut failure = None;
    let mut pending: Vec<String> = jobs.clone();
    while !pending.is_empty() {
        let v = qmp
            .execute("query-block-jobs", None)
            .await
            .map_err(|e| format!("query-block-jobs: {e}"))?;
        let mut still = Vec::new();
        for j in pending {
            let job = v
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["device"].as_str() == Some(j.as_str()));
            match job {
                None => {}
                Some(job) if job["status"] == "concluded" => {
                    if let Some(e) = job["error"].as_str() {
                        failure.get_or_insert_with(|| format!("block job {j}: {e}"));
                    }
                    let _ = qmp.execute("job-dismiss", Some(json!({"id": j}))).await;
                }
                Some(_) => still.push(j),
            }
        }
        pending = still;
        if !pending.is_empty() {
            if Instant::now() > deadline {
                failure.get_or_insert_with(|| format!("block jobs {pending:?} did not end"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for j in &jobs {
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": j})))
            .await;
    }
    match failure {
        Some(f) if consistent => Err(f),
        _ => Ok(()),
    }
}

async fn run_source(
    agent: &Agent,
    key: &Key,
    vmi: &VirtualMachineInstance,
    ms: &MigrationState,
    mig_uid: &str,
    handle: &QemuHandle,
) -> Result<bool, String> {
    let uri = target_uri(ms).ok_or("the target's address is not usable")?;
    let target = ms.target_node.clone().unwrap_or_default();
    let cfg = ms.migration_configuration.clone().unwrap_or_default();
    let disks = source_mirror_set(agent, vmi, mig_uid).await?;
    let nbd = match disks.is_empty() {
        true => None,
        false => Some(target_nbd(ms).ok_or_else(|| {
            format!(
                "{} host-local disk(s) must be copied but the target published no NBD port",
                disks.len()
            )
        })?),
    };
    let qmp = handle.qmp();
    // QEMU's setup and the start of the disk mirror (the NBD connection
    // alone takes QEMU tens of milliseconds) overlap the claim of the
    // start: a mirror changes nothing on the source's own disks, so one
    // started for a migration an abort wins is simply cancelled.
    let t0 = Instant::now();
    let setup = async {
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": qemu_capabilities(&cfg, nbd.is_some())})),
        )
        .await
        .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
        qmp.execute("migrate-set-parameters", Some(qemu_parameters(&cfg)))
            .await
            .map_err(|e| format!("migrate-set-parameters: {e}"))?;
        if let Some(nbd) = nbd {
            info!(%key, disks = disks.len(), %nbd, "mirroring host-local disks to the target");
            start_mirror(qmp, &disks, nbd, mirror_speed(&cfg)).await?;
            debug!(%key, ms = t0.elapsed().as_millis() as u64, "mirror jobs started");
        }
        Ok::<(), String>(())
    };
    // Claim the start (CAS): an abort that won the race stops us here.
    let claim = update(agent, key, mig_uid, |st| {
        let Some(ms) = st.migration_state.as_mut() else {
            return false;
        };
        if ms.is_finished() || ms.abort_requested == Some(true) {
            return false;
        }
        ms.start_timestamp = Some(now_rfc3339());
        ms.mode = Some(MigrationMode::PreCopy);
        true
    });
    let (set, started) = tokio::join!(setup, claim);
    let started = match (set, started.map_err(|e| e.to_string())) {
        (Ok(()), Ok(started)) => started,
        (Err(e), _) | (Ok(()), Err(e)) => {
            if nbd.is_some() {
                let _ = end_mirror(qmp, &disks, false).await;
            }
            return Err(e);
        }
    };
    if !started {
        if nbd.is_some() {
            let _ = end_mirror(qmp, &disks, false).await;
        }
        return Ok(false);
    }
    let mut mirroring = nbd.is_some();
    let r = send(
        agent,
        key,
        mig_uid,
        handle,
        Outgoing {
            uri: &uri,
            target: &target,
            disks: &disks,
            nbd,
            t0,
        },
        &mut mirroring,
    )
    .await;
    if mirroring {
        // Failed or aborted with mirror jobs running: stop them; the guest
        // goes on on its own, unchanged disks.
        let _ = end_mirror(qmp, &disks, false).await;
    }
    r
}

struct Outgoing<'a> {
    uri: &'a str,
    target: &'a str,
    disks: &'a [MirrorDisk],
    /// The target's NBD server; the mirror into it is already started.
    nbd: Option<SocketAddr>,
    /// When the mirror started.
    t0: Instant,
}

/// Publish progress (at most every [`PROGRESS_EVERY`]) and learn whether
/// an abort was requested.
async fn report(
    agent: &Agent,
    key: &Key,
    mig_uid: &str,
    last_report: &mut Instant,
    p: &MigrationProgress,
) -> bool {
    if last_report.elapsed() < PROGRESS_EVERY {
        return false;
    }
    *last_report = Instant::now();
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
    abort
}

async fn send(
    agent: &Agent,
    key: &Key,
    mig_uid: &str,
    handle: &QemuHandle,
    s: Outgoing<'_>,
    mirroring: &mut bool,
) -> Result<bool, String> {
    let qmp = handle.qmp();
    let mut events = qmp.subscribe_events();
    let mut last_report = Instant::now();
    let t0 = s.t0;
    let mut disk = MigrationProgress::default();
    if s.nbd.is_some() {
        // Disks first: the mirror copies the host-local disks into the
        // target's NBD exports and then keeps every new write in step
        // (READY) while the memory moves.
        let jobs: Vec<String> = s.disks.iter().map(MirrorDisk::job).collect();
        disk.phase = Some("Disks".into());
        disk.disks_mirrored = Some(s.disks.len() as u64);
        loop {
            let v = qmp
                .execute("query-block-jobs", None)
                .await
                .map_err(|e| format!("query-block-jobs: {e}"))?;
            let (done, total, ready, error) = read_block_jobs(&v, &jobs);
            debug!(%key, ms = t0.elapsed().as_millis() as u64, ready, jobs = %v, "mirror poll");
            if let Some(e) = error {
                return Err(format!("disk mirror: {e}"));
            }
            disk.disk_transferred_bytes = Some(done);
            disk.disk_total_bytes = Some(total);
            if ready {
                break;
            }
            if report(agent, key, mig_uid, &mut last_report, &disk).await {
                info!(%key, "migration abort requested while mirroring disks");
                record_failure(agent, key, mig_uid, "aborted on request", true).await;
                return Ok(false);
            }
            wait_event_or(&mut events, Duration::from_millis(50)).await;
        }
        disk.disk_mirror_ms = Some(t0.elapsed().as_millis() as u64);
        info!(%key, ms = ?disk.disk_mirror_ms, bytes = ?disk.disk_transferred_bytes, "disks in step: migrating memory");
    }
    info!(%key, uri = %s.uri, target = %s.target, "migrating");
    let t1 = Instant::now();
    qmp.execute("migrate", Some(json!({"uri": s.uri})))
        .await
        .map_err(|e| format!("migrate {}: {e}", s.uri))?;
    let mut cancel_sent = false;
    let mut continued = false;
    loop {
        let mut v = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| format!("query-migrate: {e}"))?;
        // QEMU says `completed` (and sends the event) a moment before it
        // has computed `total-time` and `downtime` (both 0 until then).
        let mut settle = 0;
        while v["status"] == "completed"
            && v["total-time"].as_u64().unwrap_or(0) == 0
            && settle < 50
        {
            settle += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
            v = qmp
                .execute("query-migrate", None)
                .await
                .map_err(|e| format!("query-migrate: {e}"))?;
        }
        let with_disk = |mut p: MigrationProgress| {
            p.phase = Some("Memory".into());
            p.disk_transferred_bytes = disk.disk_transferred_bytes;
            p.disk_total_bytes = disk.disk_total_bytes;
            p.disks_mirrored = disk.disks_mirrored;
            p.disk_mirror_ms = disk.disk_mirror_ms;
            p
        };
        match read_query_migrate(&v) {
            Outcome::PreSwitchover if continued => {}
            Outcome::PreSwitchover => {
                debug!(%key, ms = t1.elapsed().as_millis() as u64, "pre-switchover: finishing the mirror");
                // The guest is paused: finish the disk copy, then let QEMU
                // send the device state (the target runs the guest only
                // after that).
                if *mirroring {
                    if let Err(e) = end_mirror(qmp, s.disks, true).await {
                        let _ = qmp.execute("migrate_cancel", None).await;
                        return Err(format!("finishing the disk mirror: {e}"));
                    }
                    *mirroring = false;
                }
                debug!(%key, ms = t1.elapsed().as_millis() as u64, "mirror finished: migrate-continue");
                qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                    .await
                    .map_err(|e| format!("migrate-continue: {e}"))?;
                continued = true;
            }
            Outcome::InProgress(p) => {
                debug!(%key, ms = t1.elapsed().as_millis() as u64, status = %v["status"], "migration poll");
                let p = with_disk(p);
                if report(agent, key, mig_uid, &mut last_report, &p).await && !cancel_sent {
                    info!(%key, "migration abort requested: migrate_cancel");
                    let _ = qmp.execute("migrate_cancel", None).await;
                    cancel_sent = true;
                }
            }
            Outcome::Completed(p) => {
                let mut p = with_disk(p);
                p.phase = None;
                if p.total_time_ms.is_none() {
                    p.total_time_ms = Some(t1.elapsed().as_millis() as u64);
                }
                info!(%key, target = %s.target, downtime_ms = ?p.downtime_ms, total_ms = ?p.total_time_ms, disk_ms = ?p.disk_mirror_ms, "migration completed");
                let now = now_rfc3339();
                let target = s.target.to_string();
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
        wait_event_or(&mut events, POLL).await;
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
    fn the_target_publishes_its_memory_and_nbd_ports_by_role() {
        let mut ms = scheduled();
        ms.target_node_address = Some("10.0.0.2".into());
        ms.target_direct_migration_node_ports = [
            ("5000".to_string(), BLOCK_MIGRATION_PORT),
            ("4444".to_string(), 0),
        ]
        .into();
        assert_eq!(target_uri(&ms).as_deref(), Some("tcp:10.0.0.2:4444"));
        assert_eq!(target_nbd(&ms), Some("10.0.0.2:5000".parse().unwrap()));
        ms.target_direct_migration_node_ports = [("4444".to_string(), 0)].into();
        assert_eq!(target_nbd(&ms), None, "shared storage: no NBD port");
    }

    fn disk(id: &str, path: &str, read_only: bool) -> krvirt_hypervisor::DiskConfig {
        serde_json::from_value(json!({
            "id": id, "path": path, "format": "qcow2", "bus": "virtio", "read_only": read_only,
        }))
        .unwrap()
    }

    #[test]
    fn only_writable_host_local_disks_are_mirrored() {
        let run = "/var/lib/krvirt/run/vmi/u1";
        let mut config: krvirt_hypervisor::VmConfig = serde_json::from_value(json!({
            "name": "v", "uuid": "6f1c7d2e-8b1a-4c53-9d7e-0a1b2c3d4e5f", "accel": "tcg",
            "memory_bytes": 134217728,
            "run": krvirt_hypervisor::RunPaths::in_dir(run),
        }))
        .unwrap();
        config.disks = vec![
            disk("root", &format!("{run}/disk-root.qcow2"), false),
            disk("seed", &format!("{run}/disk-seed-cidata.img"), true),
            disk("vol", "/srv/pool/default.vol", false),
            disk("scratch", &format!("{run}/disk-scratch.qcow2"), false),
        ];
        let mut rbd = disk("ceph", "", false);
        rbd.rbd = Some(krvirt_hypervisor::RbdDisk {
            pool: "p".into(),
            image: "i".into(),
            conf: None,
            user: None,
            monitors: vec![],
        });
        config.disks.push(rbd);
        let plan = plan::Plan {
            config,
            prep: vec![
                PrepStep::Overlay {
                    path: format!("{run}/disk-root.qcow2").into(),
                    backing: "/images/base.qcow2".into(),
                    backing_format: krvirt_hypervisor::DiskFormat::Qcow2,
                },
                PrepStep::Blank {
                    path: format!("{run}/disk-scratch.qcow2").into(),
                    size_bytes: 1 << 30,
                },
            ],
        };
        assert_eq!(
            mirrored_disks(&plan),
            vec![
                MirrorDisk {
                    node: "drive0-fmt".into(),
                    sync: MirrorSync::Top
                },
                MirrorDisk {
                    node: "drive3-fmt".into(),
                    sync: MirrorSync::Full
                },
            ]
        );
        assert_eq!(mirrored_disks(&plan)[0].job(), "mig-drive0-fmt");
    }

    #[test]
    fn block_jobs_are_ready_only_when_every_one_is() {
        let jobs = vec!["mig-drive0-fmt".to_string(), "mig-drive1-fmt".to_string()];
        let v = json!([
            {"device": "mig-drive0-fmt", "offset": 10, "len": 10, "ready": true, "status": "ready"},
            {"device": "mig-drive1-fmt", "offset": 5, "len": 20, "ready": false, "status": "running"},
            {"device": "other", "offset": 100, "len": 100, "ready": false},
        ]);
        assert_eq!(read_block_jobs(&v, &jobs), (15, 30, false, None));
        let v = json!([
            {"device": "mig-drive0-fmt", "offset": 10, "len": 10, "ready": true},
            {"device": "mig-drive1-fmt", "offset": 20, "len": 20, "ready": true},
        ]);
        assert_eq!(read_block_jobs(&v, &jobs), (30, 30, true, None));
        let v = json!([
            {"device": "mig-drive0-fmt", "offset": 1, "len": 10, "status": "concluded",
             "error": "Connection reset by peer"},
        ]);
        let (_, _, ready, err) = read_block_jobs(&v, &jobs);
        assert!(!ready);
        assert!(err.unwrap().contains("Connection reset"));
        assert_eq!(
            read_query_migrate(&json!({"status": "pre-switchover"})),
            Outcome::PreSwitchover
        );
    }

    #[test]
    fn the_source_pauses_before_the_switch_over_only_to_finish_a_mirror() {
        let cfg = MigrationConfiguration::default();
        let state = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|c| c["capability"] == "pause-before-switchover")
                .unwrap()["state"]
                .clone()
        };
        assert_eq!(state(&qemu_capabilities(&cfg, true)), true);
        assert_eq!(state(&qemu_capabilities(&cfg, false)), false);
        assert_eq!(mirror_speed(&cfg), 0);
        let slow = MigrationConfiguration {
            bandwidth_per_migration: Some(krvirt_api::quantity::Quantity::new("1Mi")),
            ..Default::default()
        };
        assert_eq!(mirror_speed(&slow), 1 << 20);
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
