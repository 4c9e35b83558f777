//! The agent loop: one per host.
//!
//! - On start: decide the accelerator, read the inventory, register the
//!   Host and keep its heartbeat; re-attach to every QEMU still running from
//!   an earlier agent (run directories on disk hold all it needs).
//! - Then watch the VMIs bound to this host and reconcile each one, one at a
//!   time per VMI, from the VMI in the API and the QEMU on this host:
//!   launch, report Running, notice a guest that powered off (Succeeded) or
//!   a QEMU that died (Failed), stop gracefully on deletion, clean up and
//!   release the VMI's finalizer.
//!
//! The agent keeps no state that is not on disk or in the API: killed and
//! restarted at any point, it converges again and the guests never notice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING, reason as event_reason};
use krvirt_api::host::{
    AcceleratorStatus, Host, HostCpu, HostResources, HostSpec, HostStatus, HugepagesPool, NumaNode,
};
use krvirt_api::kubevirt::{
    KrvirtRuntime, PhaseTransitionTimestamp, VMI_HOST_FINALIZER, VirtualMachineInstance,
    VirtualMachineInstanceStatus, VmiPhase, vmi_conditions,
};
use krvirt_api::meta::{Condition, ConditionStatus, ObjectMeta, now_rfc3339, set_condition};
use krvirt_api::quantity::Quantity;
use krvirt_client::events::EventRecorder;
use krvirt_client::{Client, ClientError, ListParams, PatchTarget, ResumeOptions};
use krvirt_controller::queue::{Key, WorkQueue};
use krvirt_hypervisor::{
    Accel, AccelDecision, AccelMode, DiskFormat, LaunchOptions, QemuHandle, RunPaths, RunState,
    launch_with, reattach,
};
use krvirt_image::{ImageError, ImageStore};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::inventory::read_inventory;
use crate::plan::{self, ImageResolver, PrepStep};

/// VMI annotation the `stop` subresource sets to override the grace period.
pub const GRACE_ANNOTATION: &str = "krvirt.io/stop-grace-period-seconds";
/// Condition reason when `dedicatedCpuPlacement` cannot be met here now.
pub const REASON_INSUFFICIENT_CPUS: &str = "InsufficientDedicatedCpus";
/// The VMI's hugepages could not be provided (pool too small, no mount).
pub const REASON_HUGEPAGES: &str = "InsufficientHugepages";

/// The hugetlbfs mount for pages of `size` bytes under the data dir
/// (`{data_dir}/hugepages-2Mi`), mounted (mode 1777: the unprivileged QEMU
/// user creates its backing file there) unless it already is.
pub fn hugetlbfs_mount(data_dir: &Path, name: &str, size: u64) -> Result<PathBuf, String> {
    let dir = data_dir.join(format!("hugepages-{name}"));
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4).is_some_and(|m| Path::new(m) == dir)
                && l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("hugetlbfs "))
        });
    if mounted {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let pagesize = if size >= 1 << 30 {
        format!("{}G", size >> 30)
    } else {
        format!("{}M", size >> 20)
    };
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "hugetlbfs",
            "-o",
            &format!("pagesize={pagesize},mode=1777"),
            "hugetlbfs",
        ])
        .arg(&dir)
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mounting hugetlbfs ({pagesize} pages) on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(dir)
}
/// VMI status `reason` when the guest powered itself off.
pub const REASON_GUEST_SHUTDOWN: &str = "GuestShutdown";
/// File in each run directory naming the VMI it belongs to.
const VMI_FILE: &str = "vmi.json";
/// How often every local VMI is looked at again without an event.
const RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Accel(#[from] krvirt_hypervisor::AccelError),
    #[error(transparent)]
    Process(#[from] krvirt_hypervisor::ProcessError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("VMI {0} is not running on this host")]
    NotRunningHere(String),
    #[error("kind {0} is not registered")]
    UnknownKind(&'static str),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let context = context.into();
    move |source| AgentError::Io { context, source }
}

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name (the Host object's name, VMIs' `status.nodeName`).
    pub node_name: String,
    /// Where run directories live: `{data_dir}/run/vmi/{uid}`.
    pub data_dir: PathBuf,
    pub accel_mode: AccelMode,
    pub qemu_bin: PathBuf,
    /// Labels of the Host object (nodeSelector matches them).
    pub labels: BTreeMap<String, String>,
    /// Taints the Host is created with (an existing Host keeps its own).
    pub taints: Vec<krvirt_api::kubevirt::Taint>,
    pub heartbeat_interval: Duration,
    /// Filesystem root for inventory and accelerator detection (`/`).
    pub sys_root: PathBuf,
    /// Account QEMU runs as (created with `useradd` if missing);
    /// `None`: QEMU runs as root, without user isolation.
    pub qemu_user: Option<String>,
    /// Parent of the VMs' cgroups, relative to the hierarchy root; `None`:
    /// `krvirt` next to the agent's own cgroup (see krvirt_hypervisor::cgroup).
    pub cgroup_parent: Option<String>,
    /// Port of this agent's host API (advertised in the Host's
    /// `status.daemonEndpoints.agentEndpoint`); `None`: it serves none.
    pub host_api_port: Option<u16>,
    /// The server's host lease (`KRVIRT_HOST_LEASE_SECONDS`, as the server
    /// reads it): without renewal for less than that, the agent kills its
    /// guests (crate::fence).
    pub host_lease: Duration,
}

impl AgentConfig {
    pub fn new(node_name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            node_name: node_name.into(),
            data_dir: data_dir.into(),
            accel_mode: AccelMode::Auto,
            qemu_bin: krvirt_hypervisor::qemu_binary(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            // KRVIRT_HEARTBEAT_INTERVAL_MS: tests renew the lease faster.
            heartbeat_interval: std::env::var("KRVIRT_HEARTBEAT_INTERVAL_MS")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map_or(Duration::from_secs(10), Duration::from_millis),
            sys_root: PathBuf::from("/"),
            qemu_user: Some(krvirt_hypervisor::DEFAULT_QEMU_USER.to_string()),
            cgroup_parent: None,
            host_api_port: None,
            host_lease: krvirt_controller::hostlife::lease_duration(),
        }
    }
}

/// Default of `--qemu-user`.
pub const DEFAULT_QEMU_USER_NAME: &str = krvirt_hypervisor::DEFAULT_QEMU_USER;

/// The user QEMU runs as, when it is not root (storage's hot-plug grants
/// it access to the Volumes it attaches).
pub(crate) static QEMU_USER: std::sync::OnceLock<krvirt_hypervisor::QemuUser> =
    std::sync::OnceLock::new();

/// How this host confines QEMU: its user (created if missing) and cgroups.
fn launch_options(cfg: &AgentConfig) -> Result<LaunchOptions, AgentError> {
    if !nix::unistd::geteuid().is_root() {
        warn!("krvirt is not running as root: QEMU runs as krvirt's own user, without cgroups");
        return Ok(LaunchOptions::default());
    }
    let user = match cfg.qemu_user.as_deref() {
        None | Some("root") | Some("") => {
            warn!("QEMU runs as root (--qemu-user root): guests are not isolated by user");
            None
        }
        Some(name) => {
            let u = krvirt_hypervisor::QemuUser::ensure(name).map_err(|e| AgentError::Io {
                context: format!("QEMU user {name} (--qemu-user)"),
                source: std::io::Error::other(e.to_string()),
            })?;
            info!(user = %u.name, uid = u.uid, "QEMU runs unprivileged");
            let _ = QEMU_USER.set(u.clone());
            Some(u)
        }
    };
    // /dev/kvm belongs to group kvm.
    let extra_groups = match (&user, nix::unistd::Group::from_name("kvm")) {
        (Some(_), Ok(Some(g))) => vec![g.gid.as_raw()],
        _ => Vec::new(),
    };
    let cgroups = match krvirt_hypervisor::Cgroups::host(cfg.cgroup_parent.as_deref()) {
        Ok(c) => {
            info!(version = ?c.version, parents = ?c.parents, "per-VM cgroups");
            Some(c)
        }
        Err(e) => {
            warn!(error = %e, "no usable cgroups: guests with resource limits will not start");
            None
        }
    };
    Ok(LaunchOptions {
        user,
        extra_groups,
        cgroups,
    })
}

/// Removes a run directory and what its QEMU left on the host (cgroup).
fn remove_run_dir(dir: &Path) {
    if let Err(e) = krvirt_hypervisor::release(&RunPaths::in_dir(dir)) {
        warn!(dir = %dir.display(), error = %e, "cgroup of a finished guest not removed");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What a run directory records about its VMI.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    namespace: String,
    name: String,
    uid: String,
}

/// A QEMU this agent runs (or stops).
struct LocalVm {
    key: Key,
    uid: String,
    handle: Arc<QemuHandle>,
    stopping: AtomicBool,
    monitor: tokio::task::JoinHandle<()>,
}

impl Drop for LocalVm {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

/// Image resolution through the local image store.
struct Images(Arc<ImageStore>);

fn disk_format(image: &str, path: &Path) -> Result<DiskFormat, ImageError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|_| ImageError::FileNotFound {
        image: image.to_string(),
        path: "disk".into(),
        host_path: path.to_path_buf(),
    })?;
    Ok(match f.read_exact(&mut magic) {
        Ok(()) if magic == *b"QFI\xfb" => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    })
}

impl ImageResolver for Images {
    fn disk(&self, reference: &str) -> Result<(PathBuf, DiskFormat), ImageError> {
        let resolved = self.0.resolve_verified(reference)?;
        let disk = resolved.disk.ok_or_else(|| ImageError::FileNotFound {
            image: resolved.name.clone(),
            path: "disk (this image has none; it is a kernel-boot image)".into(),
            host_path: resolved.root.clone(),
        })?;
        let format = disk_format(&resolved.name, &disk)?;
        Ok((disk, format))
    }

    fn kernel_boot(
        &self,
        reference: &str,
        kernel_path: Option<&str>,
        initrd_path: Option<&str>,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>), ImageError> {
        let resolved = self.0.resolve(reference)?;
        let p = krvirt_image::kernel_boot_paths(&resolved, kernel_path, initrd_path)?;
        Ok((p.kernel, p.initrd))
    }
}

struct Inner {
    cfg: AgentConfig,
    client: Client,
    images: Images,
    accel: AccelDecision,
    qemu_version: String,
    vmi_kind: &'static KindInfo,
    host_kind: &'static KindInfo,
    /// Running (or stopping) QEMUs by VMI uid.
    vms: Mutex<HashMap<String, Arc<LocalVm>>>,
    queue: WorkQueue,
    /// Volume provisioning and resolution (local storage pools).
    volumes: crate::storage::Volumes,
    /// Lifecycle events (`source.component` = [`COMPONENT`]).
    events: EventRecorder,
    /// Host networking of the VMIs' NICs (crate::network).
    net: Arc<crate::network::HostNet>,
    /// QEMU's user and cgroups.
    launch_opts: LaunchOptions,
    /// Held while dedicated CPUs are chosen and taken by a launch.
    cpu_alloc: tokio::sync::Mutex<()>,
    /// Live migrations in progress here (source or target).
    migrations: crate::migration::Migrations,
    /// When the host lease was last renewed (self-fencing, crate::fence).
    lease: crate::fence::LeaseClock,
}

/// `source.component` of the agent's events.
pub const COMPONENT: &str = "krvirt-agent";

/// Event reference to a VMI.
fn vmi_ref(vmi: &VirtualMachineInstance) -> ObjectReference {
    ObjectReference {
        kind: Some("VirtualMachineInstance".into()),
        namespace: vmi.metadata.namespace.clone(),
        name: vmi.metadata.name.clone(),
        uid: vmi.metadata.uid.clone(),
        api_version: Some("kubevirt.io/v1".into()),
        ..Default::default()
    }
}

/// A host agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

fn kind(name: &'static str) -> Result<&'static KindInfo, AgentError> {
    krvirt_api::find_kind(name).ok_or(AgentError::UnknownKind(name))
}

impl Agent {
    /// Prepare an agent: decide the accelerator and check QEMU. Nothing is
    /// registered or started until [`Agent::run`].
    pub fn new(
        cfg: AgentConfig,
        client: Client,
        images: Arc<ImageStore>,
    ) -> Result<Agent, AgentError> {
        let accel = krvirt_hypervisor::detect(cfg.accel_mode, &cfg.sys_root)?;
        let qemu_version = krvirt_hypervisor::qemu_version(&cfg.qemu_bin)?;
        if accel.accel == Accel::Tcg {
            warn!(reason = %accel.reason, "using TCG software emulation");
        }
        let events = EventRecorder::new(client.clone(), COMPONENT, Some(&cfg.node_name));
        let net = Arc::new(crate::network::HostNet::new(
            &cfg.data_dir,
            client.clone(),
            &cfg.node_name,
        ));
        let launch_opts = launch_options(&cfg)?;
        let volumes = crate::storage::Volumes::new(
            client.clone(),
            cfg.node_name.clone(),
            cfg.data_dir.clone(),
            images.clone(),
        )
        .map_err(|e| AgentError::Io {
            context: "volumes".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let lease = crate::fence::LeaseClock::new(cfg.host_lease);
        Ok(Agent {
            inner: Arc::new(Inner {
                lease,
                events,
                cfg,
                client,
                images: Images(images),
                accel,
                qemu_version,
                vmi_kind: kind("virtualmachineinstances")?,
                host_kind: kind("hosts")?,
                vms: Mutex::new(HashMap::new()),
                queue: WorkQueue::new(),
                volumes,
                net,
                launch_opts,
                cpu_alloc: tokio::sync::Mutex::new(()),
                migrations: Default::default(),
            }),
        })
    }

    pub fn accelerator(&self) -> &AccelDecision {
        &self.inner.accel
    }

    pub fn node_name(&self) -> &str {
        &self.inner.cfg.node_name
    }

    /// The agent's data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.inner.cfg.data_dir
    }

    fn run_root(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("run").join("vmi")
    }

    fn run_dir(&self, uid: &str) -> PathBuf {
        self.run_root().join(uid)
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LocalVm>>> {
        self.inner.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The QEMU of a VMI uid running here.
    pub(crate) fn qemu_of(&self, uid: &str) -> Option<Arc<QemuHandle>> {
        self.local(uid).map(|v| v.handle.clone())
    }

    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    pub(crate) fn volumes(&self) -> &crate::storage::Volumes {
        &self.inner.volumes
    }

    fn local(&self, uid: &str) -> Option<Arc<LocalVm>> {
        self.vms().get(uid).cloned()
    }

    /// Run until `shutdown`: register, re-attach, then reconcile.
    /// QEMU processes keep running when the agent stops.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        self.register().await?;
        self.reattach_all().await;
        let mut tasks = Vec::new();
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.heartbeat_loop().await }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.fence_watchdog().await }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.watch_loop().await }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.resync_loop().await }));
        let me = self.clone();
        tasks.push(tokio::spawn(crate::migration::run_target_watch(me)));
        let volumes = self.inner.volumes.clone();
        tasks.push(tokio::spawn(async move {
            volumes.run(Duration::from_millis(500)).await
        }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            crate::snapshot::run(me, Duration::from_millis(500)).await
        }));
        let net = self.inner.net.clone();
        tasks.push(tokio::spawn(async move { net.run().await }));
        for _ in 0..4 {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.worker().await }));
        }
        shutdown.cancelled().await;
        self.inner.queue.shut_down();
        for t in tasks {
            t.abort();
        }
        // Drop our QMP connections; the guests run on.
        self.vms().clear();
        Ok(())
    }

    async fn worker(&self) {
        while let Some(key) = self.inner.queue.next().await {
            match self.reconcile(&key).await {
                Ok(Some(after)) => self.inner.queue.add_after(key.clone(), after),
                Ok(None) => {}
                Err(e) => {
                    debug!(%key, error = %e, "VMI sync failed; retrying");
                    self.inner
                        .queue
                        .add_after(key.clone(), Duration::from_millis(500));
                }
            }
            self.inner.queue.done(&key);
        }
    }

    // ----- host registration -------------------------------------------------

    fn host_status(&self) -> Result<HostStatus, AgentError> {
        let inv = read_inventory(&self.inner.cfg.sys_root)?;
        let resources = HostResources {
            cpu: Some(Quantity::new(inv.cpus.len().to_string())),
            memory: Some(Quantity::new(format!("{}Ki", inv.memory_bytes / 1024))),
        };
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            Condition {
                reason: Some("AgentReady".into()),
                message: Some("the host agent is running".into()),
                ..Condition::new("Ready", ConditionStatus::True)
            },
        );
        let tcg = self.inner.accel.accel == Accel::Tcg;
        set_condition(
            &mut conditions,
            Condition {
                reason: Some(
                    if tcg {
                        "SoftwareEmulation"
                    } else {
                        "KVMAvailable"
                    }
                    .into(),
                ),
                message: Some(self.inner.accel.reason.clone()),
                ..Condition::new(
                    krvirt_api::host::host_conditions::KVM_UNAVAILABLE,
                    if tcg {
                        ConditionStatus::True
                    } else {
                        ConditionStatus::False
                    },
                )
            },
        );
        Ok(HostStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            cpus: inv
                .cpus
                .iter()
                .map(|c| HostCpu {
                    id: c.id,
                    core: c.core,
                    socket: c.socket,
                    numa_node: c.numa_node,
                })
                .collect(),
            numa_nodes: inv
                .numa_nodes
                .iter()
                .map(|n| NumaNode {
                    id: n.id,
                    cpus: n.cpus.clone(),
                    memory_bytes: n.memory_bytes,
                })
                .collect(),
            hugepages: inv
                .hugepages
                .iter()
                .map(|h| HugepagesPool {
                    page_size: Quantity::new(h.page_size_bytes.to_string()),
                    total: h.total,
                    free: h.free,
                })
                .collect(),
            accelerator: Some(AcceleratorStatus {
                type_: match self.inner.accel.accel {
                    Accel::Kvm => krvirt_api::host::Accelerator::Kvm,
                    Accel::Tcg => krvirt_api::host::Accelerator::Tcg,
                },
                reason: Some(self.inner.accel.reason.clone()),
            }),
            qemu_version: Some(self.inner.qemu_version.clone()),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            addresses: crate::migration::host_addresses(
                &self.inner.cfg.node_name,
                self.inner.client.base_url(),
            ),
            daemon_endpoints: self.inner.cfg.host_api_port.map(|port| {
                krvirt_api::host::HostDaemonEndpoints {
                    agent_endpoint: Some(krvirt_api::host::DaemonEndpoint { port }),
                }
            }),
            conditions,
            heartbeat_time: Some(now_rfc3339()),
        })
    }

    async fn register(&self) -> Result<(), AgentError> {
        let name = &self.inner.cfg.node_name;
        let mut labels = self.inner.cfg.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), name.clone());
        labels.insert(
            "krvirt.io/accelerator".into(),
            self.inner.accel.accel.qemu_name().to_string(),
        );
        let host = Host {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: labels.clone(),
                ..Default::default()
            },
            spec: HostSpec {
                taints: self.inner.cfg.taints.clone(),
                ..Default::default()
            },
            ..Default::default()
        };
        let obj = serde_json::to_value(&host).map_err(|source| AgentError::Decode {
            what: "Host".into(),
            source,
        })?;
        let client = &self.inner.client;
        match client.create(self.inner.host_kind, "", &obj).await {
            Ok(_) => info!(host = %name, "registered host"),
            Err(e) if e.code() == Some(409) => {
                client
                    .merge_patch(
                        self.inner.host_kind,
                        "",
                        name,
                        &json!({"metadata": {"labels": labels}}),
                        PatchTarget::Main,
                    )
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        self.report_host().await
    }

    async fn report_host(&self) -> Result<(), AgentError> {
        // Stamped before `heartbeatTime` is: the agent's fencing deadline
        // never falls after the server's.
        let stamped = tokio::time::Instant::now();
        let status = self.host_status()?;
        self.inner
            .client
            .merge_patch(
                self.inner.host_kind,
                "",
                &self.inner.cfg.node_name,
                &json!({ "status": status }),
                PatchTarget::Status,
            )
            .await?;
        self.inner.lease.renewed(stamped);
        // For the watchdog process that outlives this agent (crate::fence).
        let lease_file = self.inner.lease.lease_file();
        if let Err(e) = crate::fence::write_lease_file(&self.inner.cfg.data_dir, &lease_file) {
            debug!(error = %e, "lease file not written");
        }
        Ok(())
    }

    async fn heartbeat_loop(&self) {
        let lease = &self.inner.lease;
        let every = lease.heartbeat_every(self.inner.cfg.heartbeat_interval);
        let bound = lease.attempt_timeout();
        loop {
            tokio::time::sleep(every).await;
            let renewed = match tokio::time::timeout(bound, self.report_host()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    // The Host may have been deleted: register again.
                    warn!(error = %e, "heartbeat failed");
                    matches!(
                        tokio::time::timeout(bound, self.register()).await,
                        Ok(Ok(()))
                    )
                }
                Err(_) => {
                    warn!(timeout_ms = bound.as_millis() as u64, "heartbeat timed out");
                    false
                }
            };
            if renewed {
                self.report_fenced().await;
            }
        }
    }

    // ----- self-fencing ----------------------------------------------------------

    /// Kill every guest once the lease has not been renewed for the
    /// fencing bound (crate::fence): the server may restart them elsewhere
    /// once the lease runs out.
    async fn fence_watchdog(&self) {
        let lease = &self.inner.lease;
        loop {
            tokio::time::sleep(lease.check_every()).await;
            if lease.fresh() {
                continue;
            }
            let vms: Vec<Arc<LocalVm>> = self.vms().values().cloned().collect();
            if !vms.is_empty() {
                self.self_fence(vms).await;
            }
        }
    }

    async fn self_fence(&self, vms: Vec<Arc<LocalVm>>) {
        let lease = &self.inner.lease;
        let unrenewed = lease.unrenewed_for();
        // Kill them all first, then wait and write down what was done.
        for vm in &vms {
            vm.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = vm.handle.kill() {
                warn!(key = %vm.key, error = %e, "self-fencing: cannot kill QEMU");
            }
        }
        let killed_at = now_rfc3339();
        for vm in &vms {
            match vm.handle.wait_exit(lease.kill_wait()).await {
                Ok(true) => {}
                _ => warn!(key = %vm.key, pid = vm.handle.pid(), "self-fencing: QEMU not gone yet"),
            }
            let rec = crate::fence::FenceRecord {
                namespace: vm.key.namespace.clone(),
                name: vm.key.name.clone(),
                uid: vm.uid.clone(),
                pid: vm.handle.pid(),
                killed_at: killed_at.clone(),
                unrenewed_ms: unrenewed.as_millis() as u64,
                fence_after_ms: lease.fence_after().as_millis() as u64,
                lease_ms: lease.lease().as_millis() as u64,
            };
            if let Err(e) = crate::fence::write_record(&self.inner.cfg.data_dir, &rec) {
                warn!(key = %vm.key, error = %e, "self-fencing: record not written");
            }
            warn!(
                key = %vm.key,
                pid = rec.pid,
                unrenewed_ms = rec.unrenewed_ms,
                "self-fenced: lease not renewed, guest killed before the server restarts it elsewhere"
            );
            self.vms().remove(&vm.uid);
        }
        for vm in &vms {
            self.inner.net.release(&vm.uid).await;
        }
    }

    /// Back in touch: report the guests killed by self-fencing (event, and
    /// the VMI Failed if the server has not fenced it yet), then forget them.
    async fn report_fenced(&self) {
        let data_dir = &self.inner.cfg.data_dir;
        let me = self.inner.cfg.node_name.as_str();
        for rec in crate::fence::records(data_dir) {
            let key = Key::new(&rec.namespace, &rec.name);
            let message = rec.message(me);
            match self.get_vmi(&key).await {
                Ok(Some((vmi, rv)))
                    if vmi.metadata.uid.as_deref() == Some(rec.uid.as_str())
                        && vmi.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(me)
                        && !vmi
                            .status
                            .as_ref()
                            .and_then(|s| s.phase)
                            .unwrap_or_default()
                            .is_final() =>
                {
                    let st = self_fenced_status(&vmi, &message);
                    if let Err(e) = self.write_status(&key, &rv, &st).await {
                        debug!(%key, error = %e, "self-fenced status not written; retrying");
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(%key, error = %e, "self-fenced VMI not read; retrying");
                    continue;
                }
            }
            self.inner.events.record_ref(
                ObjectReference {
                    kind: Some("VirtualMachineInstance".into()),
                    namespace: Some(rec.namespace.clone()),
                    name: Some(rec.name.clone()),
                    uid: Some(rec.uid.clone()),
                    api_version: Some("kubevirt.io/v1".into()),
                    ..Default::default()
                },
                WARNING,
                crate::fence::REASON_SELF_FENCED,
                &message,
            );
            info!(%key, uid = %rec.uid, "reported a guest killed by self-fencing");
            crate::fence::remove_record(data_dir, &rec.uid);
        }
    }

    // ----- re-attach -----------------------------------------------------------

    fn run_records(&self) -> Vec<(PathBuf, RunRecord)> {
        let Ok(entries) = std::fs::read_dir(self.run_root()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read(e.path().join(VMI_FILE)).ok()?;
                let rec: RunRecord = serde_json::from_slice(&text).ok()?;
                Some((e.path(), rec))
            })
            .collect()
    }

    /// Adopt every QEMU an earlier agent started on this host.
    async fn reattach_all(&self) {
        for (dir, rec) in self.run_records() {
            let paths = RunPaths::in_dir(&dir);
            let key = Key::new(&rec.namespace, &rec.name);
            match reattach(&paths, &rec.uid).await {
                Ok(Some(handle)) => {
                    info!(%key, pid = handle.pid(), "re-attached to running QEMU");
                    self.adopt(key.clone(), rec.uid.clone(), handle);
                }
                Ok(None) => debug!(%key, "no running QEMU for run directory"),
                Err(e) => warn!(%key, error = %e, "cannot re-attach"),
            }
            self.inner.queue.add(key);
        }
    }

    fn adopt(&self, key: Key, uid: String, handle: QemuHandle) -> Arc<LocalVm> {
        let handle = Arc::new(handle);
        let monitor = {
            let mut events = handle.qmp().subscribe_events();
            let queue = self.inner.queue.clone();
            let key = key.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(ev) => {
                            if matches!(
                                ev.event.as_str(),
                                "SHUTDOWN" | "STOP" | "RESUME" | "RESET" | "GUEST_PANICKED"
                            ) {
                                queue.add(key.clone());
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            queue.add(key.clone())
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            // QMP went away: QEMU exited (or was killed).
                            queue.add(key.clone());
                            break;
                        }
                    }
                }
            })
        };
        let vm = Arc::new(LocalVm {
            key,
            uid: uid.clone(),
            handle,
            stopping: AtomicBool::new(false),
            monitor,
        });
        self.vms().insert(uid, vm.clone());
        vm
    }

    // ----- watch ---------------------------------------------------------------

    async fn watch_loop(&self) {
        let params = ListParams::all_namespaces()
            .fields(format!("status.nodeName={}", self.inner.cfg.node_name));
        loop {
            let mut stream = self.inner.client.watch_resumable(
                self.inner.vmi_kind,
                &params,
                ResumeOptions {
                    max_consecutive_failures: u32::MAX,
                    ..Default::default()
                },
            );
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        let (ns, name) = (
                            ev.object
                                .pointer("/metadata/namespace")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                            ev.object
                                .pointer("/metadata/name")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                        );
                        if !name.is_empty() {
                            let key = Key::new(ns, name);
                            self.start_outgoing_migration(&key, &ev.object);
                            self.inner.queue.add(key);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "VMI watch broke");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The moment a watched VMI says its migration target is ready, start
    /// sending from here, without waiting for the VMI's turn in the work
    /// queue and its re-read (the event is as fresh as a read; the start is
    /// claimed once per migration, so the reconcile's own call does
    /// nothing after this one).
    fn start_outgoing_migration(&self, key: &Key, obj: &Value) {
        if obj
            .pointer("/status/migrationState/targetNodeAddress")
            .is_none()
            || obj.pointer("/metadata/deletionTimestamp").is_some()
        {
            return;
        }
        let Ok(vmi) = serde_json::from_value::<VirtualMachineInstance>(obj.clone()) else {
            return;
        };
        if !crate::migration::source_should_start(&vmi, &self.inner.cfg.node_name) {
            return;
        }
        let Some(local) = vmi.metadata.uid.as_deref().and_then(|u| self.local(u)) else {
            return;
        };
        if local.stopping.load(Ordering::SeqCst) {
            return;
        }
        crate::migration::maybe_start_source(self, key, &vmi, local.handle.clone());
    }

    async fn resync_loop(&self) {
        loop {
            tokio::time::sleep(RESYNC).await;
            let params = ListParams::all_namespaces()
                .fields(format!("status.nodeName={}", self.inner.cfg.node_name));
            if let Ok(list) = self.inner.client.list(self.inner.vmi_kind, &params).await {
                for o in &list.items {
                    let s = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or_default();
                    self.inner
                        .queue
                        .add(Key::new(s("/metadata/namespace"), s("/metadata/name")));
                }
            }
            let keys: Vec<Key> = self.vms().values().map(|v| v.key.clone()).collect();
            for (_, rec) in self.run_records() {
                self.inner.queue.add(Key::new(&rec.namespace, &rec.name));
            }
            keys.into_iter().for_each(|k| self.inner.queue.add(k));
        }
    }

    // ----- reconcile -----------------------------------------------------------

    async fn get_vmi(
        &self,
        key: &Key,
    ) -> Result<Option<(VirtualMachineInstance, Value)>, AgentError> {
        match self
            .inner
            .client
            .get(self.inner.vmi_kind, &key.namespace, &key.name)
            .await
        {
            Ok(v) => {
                let rv = v
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null);
                let vmi = serde_json::from_value(v).map_err(|source| AgentError::Decode {
                    what: format!("VMI {key}"),
                    source,
                })?;
                Ok(Some((vmi, rv)))
            }
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// One VMI. Returns when to look again, if a time matters.
    async fn reconcile(&self, key: &Key) -> Result<Option<Duration>, AgentError> {
        let current = self.get_vmi(key).await?;
        let me = self.inner.cfg.node_name.as_str();
        let (uid, mine) = match &current {
            Some((v, _)) => (
                v.metadata.uid.clone().unwrap_or_default(),
                v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(me),
            ),
            None => (String::new(), false),
        };

        // A QEMU receiving a live migration here is not stale although the
        // VMI is still bound to its source.
        let incoming = current
            .as_ref()
            .and_then(|(v, _)| crate::migration::incoming_uid(v, me));
        // Earlier incarnations under this name (deleted while we were away,
        // or no longer bound here) are stopped and their run dirs removed.
        let stale: Vec<Arc<LocalVm>> = self
            .vms()
            .values()
            .filter(|v| {
                v.key == *key
                    && (v.uid != uid || !mine)
                    && incoming.as_deref() != Some(v.uid.as_str())
                    && !self.inner.migrations.is_target(&v.uid)
            })
            .cloned()
            .collect();
        for vm in stale {
            info!(%key, uid = %vm.uid, "stopping QEMU of a VMI that is gone");
            self.stop_local(&vm, Duration::ZERO).await;
        }
        for (dir, rec) in self.run_records() {
            if Key::new(&rec.namespace, &rec.name) == *key
                && (rec.uid != uid || !mine)
                && incoming.as_deref() != Some(rec.uid.as_str())
                && self.local(&rec.uid).is_none()
            {
                // Not while this host prepares a migration target for it.
                self.inner
                    .migrations
                    .unless_target(&rec.uid, || remove_run_dir(&dir));
            }
        }

        let Some((vmi, rv)) = current else {
            return Ok(None);
        };
        if !mine {
            return Ok(None);
        }
        let status = vmi.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(VmiPhase::Pending);
        let local = self.local(&uid);

        if vmi.metadata.deletion_timestamp.is_some() {
            if let Some(vm) = local {
                if !vm.stopping.swap(true, Ordering::SeqCst) {
                    let grace = grace_period(&vmi);
                    info!(%key, grace_s = grace.as_secs(), "stopping guest of deleted VMI");
                    let me = self.clone();
                    let involved = vmi_ref(&vmi);
                    tokio::spawn(async move {
                        me.stop_local(&vm, grace).await;
                        me.inner.events.record_ref(
                            involved,
                            NORMAL,
                            event_reason::STOPPED,
                            "The virtual machine instance was stopped",
                        );
                        me.inner.queue.add(vm.key.clone());
                    });
                }
                return Ok(None);
            }
            // Guest gone: clean up and let the VMI go.
            remove_run_dir(&self.run_dir(&uid));
            if !phase.is_final() {
                let mut st = status.clone();
                set_phase(&mut st, VmiPhase::Succeeded);
                set_condition(
                    &mut st.conditions,
                    Condition {
                        reason: Some("Deleted".into()),
                        ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
                    },
                );
                if let Err(e) = self.write_status(key, &rv, &st).await {
                    debug!(%key, error = %e, "final status not written");
                }
            }
            let finalizers: Vec<&String> = vmi
                .metadata
                .finalizers
                .iter()
                .filter(|f| f.as_str() != VMI_HOST_FINALIZER)
                .collect();
            self.inner
                .client
                .merge_patch(
                    self.inner.vmi_kind,
                    &key.namespace,
                    &key.name,
                    &json!({"metadata": {"finalizers": finalizers}}),
                    PatchTarget::Main,
                )
                .await?;
            info!(%key, "VMI cleaned up");
            return Ok(None);
        }

        match (phase, local) {
            (VmiPhase::Succeeded | VmiPhase::Failed, Some(vm)) => {
                // Ended by someone else's word: make sure QEMU is gone too.
                self.stop_local(&vm, Duration::ZERO).await;
                Ok(None)
            }
            (VmiPhase::Succeeded | VmiPhase::Failed, None) => Ok(None),
            (VmiPhase::Pending | VmiPhase::Scheduling | VmiPhase::Scheduled, None) => {
                self.launch(key, &vmi, &rv).await
            }
            (_, Some(vm)) => {
                crate::migration::maybe_start_source(self, key, &vmi, vm.handle.clone());
                self.observe(key, &vmi, &rv, &vm).await
            }
            (VmiPhase::Running | VmiPhase::Unknown, None)
                if let Some(rec) = crate::fence::record_of(&self.inner.cfg.data_dir, &uid) =>
            {
                // Killed here by self-fencing: say so (report_fenced then
                // records the event and forgets the record).
                let st = self_fenced_status(&vmi, &rec.message(me));
                self.write_status(key, &rv, &st).await?;
                Ok(None)
            }
            (VmiPhase::Running | VmiPhase::Unknown, None) => {
                let mut st = status.clone();
                set_phase(&mut st, VmiPhase::Failed);
                st.reason = Some("QemuNotFound".into());
                set_condition(
                    &mut st.conditions,
                    Condition {
                        reason: Some("QemuNotFound".into()),
                        message: Some(
                            "the guest's QEMU process is gone (host restarted or process killed)"
                                .into(),
                        ),
                        ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
                    },
                );
                warn!(%key, "running VMI has no QEMU on this host");
                self.write_status(key, &rv, &st).await?;
                Ok(None)
            }
        }
    }

    async fn write_status(
        &self,
        key: &Key,
        rv: &Value,
        status: &VirtualMachineInstanceStatus,
    ) -> Result<(), AgentError> {
        self.inner
            .client
            .replace_status(
                self.inner.vmi_kind,
                &key.namespace,
                &key.name,
                &json!({
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachineInstance",
                    "metadata": {"name": key.name, "namespace": key.namespace, "resourceVersion": rv},
                    "status": status,
                }),
            )
            .await?;
        Ok(())
    }

    async fn fail(
        &self,
        key: &Key,
        rv: &Value,
        vmi: &VirtualMachineInstance,
        reason: &str,
        message: String,
    ) -> Result<Option<Duration>, AgentError> {
        warn!(%key, %reason, %message, "VMI failed");
        self.inner
            .events
            .record_ref(vmi_ref(vmi), WARNING, reason, &message);
        let mut st = vmi.status.clone().unwrap_or_default();
        set_phase(&mut st, VmiPhase::Failed);
        st.reason = Some(reason.to_string());
        set_condition(
            &mut st.conditions,
            Condition {
                reason: Some(reason.to_string()),
                message: Some(message.clone()),
                ..Condition::new(vmi_conditions::SYNCHRONIZED, ConditionStatus::False)
            },
        );
        set_condition(
            &mut st.conditions,
            Condition {
                reason: Some(reason.to_string()),
                message: Some(message),
                ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
            },
        );
        self.write_status(key, rv, &st).await?;
        Ok(None)
    }

    async fn launch(
        &self,
        key: &Key,
        vmi: &VirtualMachineInstance,
        rv: &Value,
    ) -> Result<Option<Duration>, AgentError> {
        // Never start a guest without a fresh lease: the server may be
        // restarting this host's VMs elsewhere (crate::fence).
        if !self.inner.lease.fresh() {
            debug!(%key, "lease not renewed: not starting guests");
            return Ok(Some(Duration::from_secs(1)));
        }
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let run_dir = self.run_dir(&uid);
        // containerDisks naming registry images not pulled yet.
        let record = |(t, r, m): crate::autopull::Event| {
            self.inner.events.record_ref(vmi_ref(vmi), t, r, &m)
        };
        if let Err(e) = crate::autopull::ensure_images(&self.inner.images.0, vmi, &record).await {
            return self
                .fail(key, rv, vmi, krvirt_controller::vm::REASON_IMAGE_PULL, e)
                .await;
        }
        if let Some(after) = self.inner.net.wait_for_assignment(vmi) {
            debug!(%key, "waiting for the network controller to assign interfaces");
            return Ok(Some(after));
        }
        let volumes = match self.inner.volumes.resolve(vmi).await {
            Ok(v) => v,
            Err(crate::storage::ResolveError::Wait(why)) => {
                debug!(%key, %why, "waiting for volumes");
                return Ok(Some(Duration::from_secs(1)));
            }
            Err(crate::storage::ResolveError::Fail(why)) => {
                return self.fail(key, rv, vmi, "VolumeFailed", why).await;
            }
        };
        let plan = match plan::plan_with_volumes(
            vmi,
            self.inner.accel.accel,
            &run_dir,
            &self.inner.images,
            &volumes,
        ) {
            Ok(p) => p,
            Err(e) => {
                let reason = if e.is_image() {
                    krvirt_controller::vm::REASON_IMAGE_PULL
                } else {
                    "Unsupported"
                };
                return self.fail(key, rv, vmi, reason, e.to_string()).await;
            }
        };
        if let Err(e) = self.prepare(&run_dir, key, &uid, &plan.prep).await {
            let _ = std::fs::remove_dir_all(&run_dir);
            return self
                .fail(key, rv, vmi, "FailedToPrepare", e.to_string())
                .await;
        }
        if let Err(e) = self.inner.net.prepare(vmi, &run_dir).await {
            self.inner.net.release(&uid).await;
            let _ = std::fs::remove_dir_all(&run_dir);
            return self
                .fail(key, rv, vmi, "FailedToPrepareNetwork", e.to_string())
                .await;
        }
        // A restored memory snapshot: start paused, load it, then run.
        let resume = crate::snapshot::resume_point(self, vmi).await;
        let mut config = plan.config.clone();
        config.start_paused |= resume.is_some();
        // Dedicated CPUs: chosen among the free host CPUs, under a lock held
        // until the guest is adopted (its launch record then holds them).
        let dedicated = vmi
            .spec
            .domain
            .cpu
            .as_ref()
            .is_some_and(|c| c.dedicated_cpu_placement);
        let _cpu_guard = if dedicated {
            Some(self.inner.cpu_alloc.lock().await)
        } else {
            None
        };
        if dedicated {
            let want = config.cpu.vcpus().unwrap_or(1) as usize;
            let placed = vmi
                .metadata
                .annotations
                .get(krvirt_controller::placement::DEDICATED_CPUS_ANNOTATION)
                .map(String::as_str);
            match self.free_cpus(want, placed) {
                Ok(cpus) => config.resources.dedicated_cpus = cpus,
                Err(message) => return self.refuse_cpus(key, rv, vmi, message).await,
            }
        }
        if let Err(message) = self.memory_backing(vmi, &mut config) {
            return self.fail(key, rv, vmi, REASON_HUGEPAGES, message).await;
        }
        let launched =
            launch_with(&config, &self.inner.cfg.qemu_bin, &self.inner.launch_opts).await;
        let handle = match launched {
            Ok(h) => h,
            Err(e) => {
                return self
                    .fail(key, rv, vmi, "FailedToStart", e.to_string())
                    .await;
            }
        };
        if let Some(point) = &resume {
            let stay_paused = plan.config.start_paused;
            let r = crate::snapshot::resume(handle.qmp(), vmi, point, stay_paused).await;
            if let Err(e) = r {
                let _ = handle.kill();
                return self.fail(key, rv, vmi, "FailedToResume", e).await;
            }
        }
        let pid = handle.pid();
        info!(%key, pid, "guest started");
        self.inner.events.record_ref(
            vmi_ref(vmi),
            NORMAL,
            event_reason::STARTED,
            &format!(
                "VirtualMachineInstance started on host {}",
                self.inner.cfg.node_name
            ),
        );
        self.adopt(key.clone(), uid.clone(), handle);

        let mut st = vmi.status.clone().unwrap_or_default();
        set_phase(&mut st, VmiPhase::Running);
        st.reason = None;
        set_condition(
            &mut st.conditions,
            Condition::new(vmi_conditions::READY, ConditionStatus::True),
        );
        set_condition(
            &mut st.conditions,
            Condition::new(vmi_conditions::SYNCHRONIZED, ConditionStatus::True),
        );
        if plan.config.start_paused {
            set_condition(
                &mut st.conditions,
                Condition {
                    reason: Some("StartedPaused".into()),
                    message: Some("the guest was started paused; unpause it to run".into()),
                    ..Condition::new(vmi_conditions::PAUSED, ConditionStatus::True)
                },
            );
        }
        if self.inner.accel.accel == Accel::Tcg {
            set_condition(
                &mut st.conditions,
                Condition {
                    reason: Some("TCG".into()),
                    message: Some(self.inner.accel.reason.clone()),
                    ..Condition::new(vmi_conditions::SOFTWARE_EMULATION, ConditionStatus::True)
                },
            );
        }
        st.interfaces = self.inner.net.interfaces_status(&plan.config, &uid);
        st.krvirt_runtime = Some(KrvirtRuntime {
            pid: Some(pid),
            qemu_version: Some(self.inner.qemu_version.clone()),
            accelerator: Some(match self.inner.accel.accel {
                Accel::Kvm => krvirt_api::host::Accelerator::Kvm,
                Accel::Tcg => krvirt_api::host::Accelerator::Tcg,
            }),
            run_dir: Some(run_dir.display().to_string()),
            dedicated_cpus: (!config.resources.dedicated_cpus.is_empty()).then(|| {
                // vCPU order, not sorted: "3,2" means vCPU 0 on CPU 3.
                config
                    .resources
                    .dedicated_cpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        });
        if let Err(e) = self.write_status(key, rv, &st).await {
            // The guest runs; the next pass (observe) reports it.
            debug!(%key, error = %e, "running status not written");
            return Ok(Some(Duration::ZERO));
        }
        Ok(None)
    }

    /// `want` host CPUs for a dedicated guest: the ones the scheduler
    /// placed it on (`placed`, the `krvirt.io/dedicated-cpus` annotation,
    /// vCPU i on the i-th), checked against this host; without a placement,
    /// free CPUs no other local guest has, highest first (CPU 0 usually
    /// serves the host), in ascending order.
    /// Hugepages (`domain.memory.hugepages`) and guest NUMA passthrough
    /// (`domain.cpu.numa.guestMappingPassthrough`, after the dedicated
    /// CPUs are chosen): the hugetlbfs mount, a check that the pool has
    /// enough free pages, and the guest NUMA nodes.
    fn memory_backing(
        &self,
        vmi: &VirtualMachineInstance,
        config: &mut krvirt_hypervisor::VmConfig,
    ) -> Result<(), String> {
        let d = &vmi.spec.domain;
        let Some(hp) = d.memory.as_ref().and_then(|m| m.hugepages.as_ref()) else {
            return Ok(());
        };
        let size = hp.page_size_bytes().ok_or_else(|| {
            format!(
                "spec.domain.memory.hugepages.pageSize {:?} is not supported",
                hp.page_size
            )
        })?;
        let sys = self.inner.cfg.sys_root.join(format!(
            "sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
            size / 1024
        ));
        let free: u64 = std::fs::read_to_string(&sys)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let need = config.memory_bytes.div_ceil(size);
        if free < need {
            return Err(format!(
                "guest memory needs {need} free {} hugepages; host {} has {free}",
                hp.page_size, self.inner.cfg.node_name
            ));
        }
        let mount = hugetlbfs_mount(&self.inner.cfg.data_dir, &hp.page_size, size)?;
        config.hugepages = Some(krvirt_hypervisor::HugepagesBacking {
            mount,
            page_size_bytes: size,
        });
        let passthrough = d
            .cpu
            .as_ref()
            .and_then(|c| c.numa.as_ref())
            .is_some_and(|n| n.guest_mapping_passthrough.is_some());
        if passthrough && !config.resources.dedicated_cpus.is_empty() {
            let inv = read_inventory(&self.inner.cfg.sys_root).map_err(|e| e.to_string())?;
            let node_of = |cpu: u32| {
                inv.cpus
                    .iter()
                    .find(|c| c.id == cpu)
                    .map_or(0, |c| c.numa_node)
            };
            config.numa_nodes = plan::numa_passthrough(
                &config.resources.dedicated_cpus,
                node_of,
                config.memory_bytes,
                size,
            );
        }
        Ok(())
    }

    fn free_cpus(&self, want: usize, placed: Option<&str>) -> Result<Vec<u32>, String> {
        use krvirt_hypervisor::isolation::{format_cpu_list, parse_cpu_list};
        let allowed = krvirt_hypervisor::isolation::allowed_cpus(0).map_err(|e| e.to_string())?;
        let taken: std::collections::BTreeSet<u32> = self
            .vms()
            .values()
            .flat_map(|v| v.handle.launch_record().dedicated_cpus.clone())
            .collect();
        if let Some(placed) = placed.filter(|p| !p.trim().is_empty()) {
            let cpus: Vec<u32> = parse_cpu_list(placed)
                .map_err(|e| format!("annotation krvirt.io/dedicated-cpus: {e}"))?
                .into_iter()
                .collect();
            if cpus.len() != want {
                return Err(format!(
                    "placed on host CPUs {placed} but has {want} vCPU(s)"
                ));
            }
            if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(format!(
                    "placed on host CPU {c}, which is not usable here (usable: {})",
                    format_cpu_list(&allowed)
                ));
            }
            if let Some(c) = cpus.iter().find(|c| taken.contains(c)) {
                return Err(format!(
                    "placed on host CPU {c}, which another guest here holds"
                ));
            }
            return Ok(cpus);
        }
        let free: Vec<u32> = allowed.difference(&taken).copied().collect();
        if free.len() < want {
            return Err(format!(
                "dedicatedCpuPlacement needs {want} free host CPU(s); host CPUs {} are usable, {} taken by other guests ({} free)",
                format_cpu_list(&allowed),
                format_cpu_list(&taken),
                free.len()
            ));
        }
        let mut chosen: Vec<u32> = free.iter().rev().take(want).copied().collect();
        chosen.sort_unstable();
        Ok(chosen)
    }

    /// Not enough free CPUs: say so on the VMI and look again later.
    async fn refuse_cpus(
        &self,
        key: &Key,
        rv: &Value,
        vmi: &VirtualMachineInstance,
        message: String,
    ) -> Result<Option<Duration>, AgentError> {
        let old = vmi.status.clone().unwrap_or_default();
        let mut st = old.clone();
        set_condition(
            &mut st.conditions,
            Condition {
                reason: Some(REASON_INSUFFICIENT_CPUS.into()),
                message: Some(message.clone()),
                ..Condition::new(vmi_conditions::SYNCHRONIZED, ConditionStatus::False)
            },
        );
        if st != old {
            warn!(%key, %message, "not enough free CPUs");
            self.inner
                .events
                .record_ref(vmi_ref(vmi), WARNING, REASON_INSUFFICIENT_CPUS, &message);
            self.write_status(key, rv, &st).await?;
        }
        Ok(Some(Duration::from_secs(5)))
    }

    async fn prepare(
        &self,
        run_dir: &Path,
        key: &Key,
        uid: &str,
        steps: &[PrepStep],
    ) -> Result<(), AgentError> {
        create_private_dir(run_dir)?;
        let rec = RunRecord {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: uid.to_string(),
        };
        let text = serde_json::to_vec(&rec).map_err(|source| AgentError::Decode {
            what: "run record".into(),
            source,
        })?;
        std::fs::write(run_dir.join(VMI_FILE), text).map_err(io_err(format!(
            "writing {}",
            run_dir.join(VMI_FILE).display()
        )))?;
        for step in steps {
            match step {
                PrepStep::Overlay {
                    path,
                    backing,
                    backing_format,
                } => {
                    qemu_img(&[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-F".as_ref(),
                        backing_format.qemu_driver().as_ref(),
                        "-b".as_ref(),
                        backing.as_os_str(),
                        path.as_os_str(),
                    ])
                    .await?
                }
                PrepStep::Blank { path, size_bytes } => {
                    let size = size_bytes.to_string();
                    qemu_img(&[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        path.as_os_str(),
                        size.as_ref(),
                    ])
                    .await?
                }
                PrepStep::Seed { path, seed } => {
                    let (path, seed) = (path.clone(), seed.clone());
                    tokio::task::spawn_blocking(move || {
                        krvirt_image::write_nocloud_seed(&path, &seed).map_err(|e| AgentError::Io {
                            context: format!("writing cloud-init seed {}", path.display()),
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
                    .await
                    .map_err(|e| AgentError::Io {
                        context: "seed task".into(),
                        source: std::io::Error::other(e.to_string()),
                    })??
                }
            }
        }
        Ok(())
    }

    /// A VMI with a QEMU here: report what QEMU says.
    async fn observe(
        &self,
        key: &Key,
        vmi: &VirtualMachineInstance,
        rv: &Value,
        vm: &Arc<LocalVm>,
    ) -> Result<Option<Duration>, AgentError> {
        if vm.stopping.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let old = vmi.status.clone().unwrap_or_default();
        let mut st = old.clone();
        let state = match vm.handle.status().await {
            Ok(s) => s,
            Err(e) => {
                if vm.handle.is_alive() {
                    debug!(%key, error = %e, "QMP query failed; retrying");
                    return Ok(Some(Duration::from_secs(1)));
                }
                // QEMU died under us.
                self.vms().remove(&vm.uid);
                return self
                    .fail(
                        key,
                        rv,
                        vmi,
                        "QemuExited",
                        "the QEMU process exited unexpectedly".into(),
                    )
                    .await;
            }
        };
        match state {
            // Started paused (`-S`) counts as paused until `cont`.
            RunState::Running | RunState::Paused | RunState::Prelaunch => {
                set_phase(&mut st, VmiPhase::Running);
                set_condition(
                    &mut st.conditions,
                    Condition::new(vmi_conditions::READY, ConditionStatus::True),
                );
                if matches!(state, RunState::Paused | RunState::Prelaunch) {
                    let (reason, message) = if state == RunState::Prelaunch {
                        (
                            "StartedPaused",
                            "the guest was started paused; unpause it to run",
                        )
                    } else {
                        ("PausedByUser", "VMI was paused by user")
                    };
                    set_condition(
                        &mut st.conditions,
                        Condition {
                            reason: Some(reason.into()),
                            message: Some(message.into()),
                            ..Condition::new(vmi_conditions::PAUSED, ConditionStatus::True)
                        },
                    );
                } else {
                    st.conditions.retain(|c| c.type_ != vmi_conditions::PAUSED);
                }
                let pid = vm.handle.pid();
                let rt = st.krvirt_runtime.get_or_insert_with(Default::default);
                rt.pid = Some(pid);
                // After a live migration the run directory is this host's.
                rt.run_dir = Some(vm.handle.paths().dir.display().to_string());
                st.volume_status = self
                    .inner
                    .volumes
                    .sync_hotplug(key, vmi, vm.handle.qmp())
                    .await;
                self.inner.net.refresh_status(&vm.uid, &mut st.interfaces);
            }
            RunState::Shutdown => {
                info!(%key, "guest powered off");
                self.inner.events.record_ref(
                    vmi_ref(vmi),
                    NORMAL,
                    event_reason::SHUTDOWN,
                    "The guest powered itself off",
                );
                self.stop_local(vm, Duration::ZERO).await;
                set_phase(&mut st, VmiPhase::Succeeded);
                st.reason = Some(REASON_GUEST_SHUTDOWN.into());
                set_condition(
                    &mut st.conditions,
                    Condition {
                        reason: Some(REASON_GUEST_SHUTDOWN.into()),
                        message: Some("the guest powered itself off".into()),
                        ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
                    },
                );
            }
            RunState::GuestPanicked | RunState::InternalError => {
                self.stop_local(vm, Duration::ZERO).await;
                return self
                    .fail(
                        key,
                        rv,
                        vmi,
                        "GuestFailed",
                        format!("QEMU run state {state:?}"),
                    )
                    .await;
            }
            _ => {
                // Transitional states (prelaunch, inmigrate, …): look again.
                return Ok(Some(Duration::from_millis(500)));
            }
        }
        if st != old {
            self.write_status(key, rv, &st).await?;
        }
        Ok(None)
    }

    /// Stop a local QEMU (graceful for `grace`), forget it.
    async fn stop_local(&self, vm: &Arc<LocalVm>, grace: Duration) {
        vm.stopping.store(true, Ordering::SeqCst);
        match vm.handle.graceful_stop(grace).await {
            Ok(outcome) => info!(key = %vm.key, ?outcome, "QEMU stopped"),
            Err(e) => {
                warn!(key = %vm.key, error = %e, "stopping QEMU failed; killing it");
                let _ = vm.handle.kill();
            }
        }
        self.inner.net.release(&vm.uid).await;
        // Only this QEMU's entry: a migration target for the same uid may
        // have been adopted meanwhile.
        let mut vms = self.vms();
        if vms.get(&vm.uid).is_some_and(|cur| Arc::ptr_eq(cur, vm)) {
            vms.remove(&vm.uid);
        }
    }

    // ----- metrics -------------------------------------------------------------

    /// Per-VM figures of every guest this agent runs, read now through the
    /// agent's own QMP connections (QEMU's QMP socket serves one client, so
    /// metrics never open a second one) and /proc.
    pub async fn vm_stats(&self) -> Vec<crate::metrics::VmStats> {
        let vms: Vec<Arc<LocalVm>> = self
            .vms()
            .values()
            .filter(|v| !v.stopping.load(Ordering::SeqCst))
            .cloned()
            .collect();
        let node = self.inner.cfg.node_name.clone();
        futures::future::join_all(vms.iter().map(|vm| {
            let id = crate::metrics::VmIdentity {
                name: vm.key.name.clone(),
                namespace: vm.key.namespace.clone(),
                node: node.clone(),
            };
            crate::metrics::read_vm_stats(id, &vm.handle)
        }))
        .await
    }

    /// [`Agent::vm_stats`] as a prometheus-client collector.
    pub async fn metrics(&self) -> crate::metrics::VmMetrics {
        crate::metrics::VmMetrics {
            vms: self.vm_stats().await,
        }
    }

    // ----- live migration hooks (crate::migration) ----------------------------

    pub(crate) fn migrations(&self) -> &crate::migration::Migrations {
        &self.inner.migrations
    }

    pub(crate) fn vmi_kind(&self) -> &'static KindInfo {
        self.inner.vmi_kind
    }

    pub(crate) fn run_dir_of(&self, uid: &str) -> PathBuf {
        self.run_dir(uid)
    }

    pub(crate) fn accel_kind(&self) -> Accel {
        self.inner.accel.accel
    }

    pub(crate) fn image_resolver(&self) -> &dyn ImageResolver {
        &self.inner.images
    }

    pub(crate) fn qemu_bin(&self) -> &Path {
        &self.inner.cfg.qemu_bin
    }

    pub(crate) fn launch_options(&self) -> &LaunchOptions {
        &self.inner.launch_opts
    }

    /// A run directory with its VMI record and the disks `steps` make
    /// (overlays, blanks, seeds), as a launch prepares them.
    pub(crate) async fn prepare_run_dir(
        &self,
        run_dir: &Path,
        key: &Key,
        uid: &str,
        steps: &[PrepStep],
    ) -> Result<(), AgentError> {
        self.prepare(run_dir, key, uid, steps).await
    }

    /// Pull the VMI's containerDisk images this host lacks, as a launch
    /// does (events on the VMI); the error says which pull failed.
    pub(crate) async fn ensure_images(&self, vmi: &VirtualMachineInstance) -> Result<(), String> {
        let record = |(t, r, m): crate::autopull::Event| {
            self.inner.events.record_ref(vmi_ref(vmi), t, r, &m)
        };
        crate::autopull::ensure_images(&self.inner.images.0, vmi, &record).await
    }

    /// Track a QEMU started outside the reconcile (a migration target).
    pub(crate) fn adopt_qemu(&self, key: Key, uid: String, handle: QemuHandle) -> Arc<QemuHandle> {
        self.adopt(key, uid, handle).handle.clone()
    }

    /// Stop and forget a QEMU this agent started for `uid` (a migration
    /// target that failed) and remove its run directory.
    pub(crate) async fn discard(&self, uid: &str) {
        if let Some(vm) = self.local(uid) {
            self.stop_local(&vm, Duration::ZERO).await;
        }
        self.inner.net.release(uid).await;
        let _ = std::fs::remove_dir_all(self.run_dir(uid));
    }

    /// Host networking (a migration target prepares the guest's NICs).
    pub(crate) fn host_net(&self) -> &crate::network::HostNet {
        &self.inner.net
    }

    pub(crate) fn requeue(&self, key: Key) {
        self.inner.queue.add(key);
    }

    pub(crate) fn record_event(
        &self,
        vmi: &VirtualMachineInstance,
        type_: &str,
        reason: &str,
        message: &str,
    ) {
        self.inner
            .events
            .record_ref(vmi_ref(vmi), type_, reason, message);
    }

    // ----- host-side operations (the API server's connector) -----------------

    fn local_by_vmi(&self, vmi: &Value) -> Result<(Arc<LocalVm>, String), AgentError> {
        let uid = vmi
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = vmi
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        self.local(&uid)
            .filter(|v| !v.stopping.load(Ordering::SeqCst))
            .map(|v| (v, uid))
            .ok_or(AgentError::NotRunningHere(name))
    }

    /// A reference to the VMI with uid `uid` when its guest runs on this
    /// host (and is not being stopped): `apiVersion`, `kind` and
    /// `metadata.{namespace,name,uid}`, enough for the host operations
    /// below. The host API uses it to check that a VMI really runs here.
    pub fn running_vmi_ref(&self, uid: &str) -> Option<Value> {
        let vm = self
            .local(uid)
            .filter(|v| !v.stopping.load(Ordering::SeqCst))?;
        Some(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                "namespace": vm.key.namespace,
                "name": vm.key.name,
                "uid": vm.uid,
            }
        }))
    }

    /// Pause a running guest's vCPUs.
    pub async fn pause(&self, vmi: &Value) -> Result<(), AgentError> {
        let (vm, _) = self.local_by_vmi(vmi)?;
        vm.handle.pause().await?;
        self.inner.events.record(
            vmi,
            NORMAL,
            event_reason::PAUSED,
            "The virtual machine instance was paused",
        );
        self.inner.queue.add(vm.key.clone());
        Ok(())
    }

    /// Resume a paused guest.
    pub async fn unpause(&self, vmi: &Value) -> Result<(), AgentError> {
        let (vm, _) = self.local_by_vmi(vmi)?;
        vm.handle.resume().await?;
        self.inner.events.record(
            vmi,
            NORMAL,
            event_reason::UNPAUSED,
            "The virtual machine instance was unpaused",
        );
        self.inner.queue.add(vm.key.clone());
        Ok(())
    }

    /// Connect to the guest's serial console.
    pub async fn console(&self, vmi: &Value) -> Result<UnixStream, AgentError> {
        let (vm, _) = self.local_by_vmi(vmi)?;
        let path = vm.handle.paths().serial_socket.clone();
        UnixStream::connect(&path)
            .await
            .map_err(io_err(format!("connecting to {}", path.display())))
    }

    /// The guest's serial console log: what it printed so far and, with
    /// `follow`, what it prints next until the guest stops.
    pub fn console_log(
        &self,
        vmi: &Value,
        follow: bool,
    ) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, AgentError> {
        let uid = vmi
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let path = RunPaths::in_dir(self.run_dir(&uid)).console_log;
        if !path.exists() {
            return Err(AgentError::NotRunningHere(
                vmi.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
        let me = self.clone();
        Ok(futures::stream::unfold(
            (0u64, false),
            move |(offset, done)| {
                let path = path.clone();
                let me = me.clone();
                let uid = uid.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        match read_from(&path, offset).await {
                            Ok(chunk) if !chunk.is_empty() => {
                                let next = offset + chunk.len() as u64;
                                return Some((Ok(chunk), (next, false)));
                            }
                            Ok(_) => {
                                let running = me
                                    .local(&uid)
                                    .is_some_and(|v| !v.stopping.load(Ordering::SeqCst));
                                if !follow || !running {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => return Some((Err(e), (offset, true))),
                        }
                    }
                }
            },
        ))
    }
}

/// Read what follows `offset` in a file (at most 64 KiB).
async fn read_from(path: &Path, offset: u64) -> std::io::Result<Bytes> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf).await?;
    buf.truncate(n);
    Ok(Bytes::from(buf))
}

fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), AgentError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(io_err("running qemu-img (is qemu-utils installed?)"))?;
    if !out.status.success() {
        return Err(AgentError::Io {
            context: format!(
                "qemu-img {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// A VMI's status once self-fencing killed its guest: Failed, SelfFenced.
fn self_fenced_status(vmi: &VirtualMachineInstance, message: &str) -> VirtualMachineInstanceStatus {
    let mut st = vmi.status.clone().unwrap_or_default();
    set_phase(&mut st, VmiPhase::Failed);
    st.reason = Some(crate::fence::REASON_SELF_FENCED.into());
    set_condition(
        &mut st.conditions,
        Condition {
            reason: Some(crate::fence::REASON_SELF_FENCED.into()),
            message: Some(message.to_string()),
            ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
        },
    );
    st
}

/// Move a VMI status to `phase`, recording the transition time.
pub fn set_phase(st: &mut VirtualMachineInstanceStatus, phase: VmiPhase) {
    if st.phase != Some(phase) {
        st.phase = Some(phase);
        st.phase_transition_timestamps
            .push(PhaseTransitionTimestamp {
                phase,
                phase_transition_timestamp: now_rfc3339(),
            });
    }
}

/// How long a guest gets to shut down when its VMI is deleted: the stop
/// request's override, else the VMI's deletion grace period, else its
/// `terminationGracePeriodSeconds` (180 by default).
pub fn grace_period(vmi: &VirtualMachineInstance) -> Duration {
    let secs = vmi
        .metadata
        .annotations
        .get(GRACE_ANNOTATION)
        .and_then(|s| s.parse::<i64>().ok())
        .or(vmi.metadata.deletion_grace_period_seconds)
        .or(vmi.spec.termination_grace_period_seconds)
        .unwrap_or(180);
    Duration::from_secs(secs.max(0) as u64)
}
