//! The long-running roles of the `krvirt` binary: `up` (API server,
//! controllers and host agent in one process on the embedded store),
//! `server` and `agent`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use krvirt_agent::{Agent, AgentConfig, AgentError};
use krvirt_hypervisor::AccelMode;
use krvirt_image::ImageStore;
use krvirt_server::{ApiError, AppState, ByteStream, ConsoleStream, HostConnector, Registry};
use krvirt_store::embedded::EmbeddedStore;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Default API address of a local instance (the client verbs' default too).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8440";

/// Options shared by `up` and `agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// This host's name [default: the machine's hostname]
    #[arg(long, env = "KRVIRT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Accelerator: auto (KVM where it can boot guests, else TCG), kvm or tcg
    #[arg(long, default_value = "auto", env = "KRVIRT_ACCEL")]
    pub accel: String,
    /// Host labels, KEY=VALUE (repeatable); VMIs' nodeSelector matches them
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Taints the Host is registered with, `key[=value]:Effect` (repeatable;
    /// like kubelet's --register-with-taints: only when the Host is created,
    /// later changes go through `krvirt taint host`)
    #[arg(long = "taint", value_name = "KEY[=VALUE]:EFFECT")]
    pub taints: Vec<String>,
    /// Where built demo images are cached [default: $KRVIRT_CACHE_DIR, else ~/.cache/krvirt]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// User QEMU runs as (created if missing); `root` keeps QEMU running as
    /// root, without user isolation (logged)
    #[arg(long, default_value = krvirt_agent::agent::DEFAULT_QEMU_USER_NAME, env = "KRVIRT_QEMU_USER")]
    pub qemu_user: String,
    /// Parent cgroup of the guests, relative to the cgroup root
    /// [default: `krvirt` next to krvirt's own cgroup]
    #[arg(long, env = "KRVIRT_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
}

/// `krvirt up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// State, images and VM run directories [default: /var/lib/krvirt as root, else ~/.local/share/krvirt]
    #[arg(long, env = "KRVIRT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API listen address
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Do not create the demo VM on first start
    #[arg(long)]
    pub no_demo: bool,
    /// Store: `embedded` (a file in the data dir) or `etcd://HOST:PORT[,HOST:PORT…]`
    /// (on etcd, `up` takes part in the servers' leader election: it runs
    /// the controllers only while it leads)
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Leader lease TTL in seconds (etcd store): a dead leader is replaced within it
    #[arg(long, default_value_t = 5)]
    pub leader_ttl: i64,
    /// Serve plain HTTP without authentication (ONLY for measuring the
    /// cost of authentication: bench/api)
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Do not create the `default` NAT Network (the pod network): pod
    /// interfaces then fall back to QEMU user networking
    #[arg(long)]
    pub no_default_network: bool,
    #[command(flatten)]
    pub host: HostArgs,
}

/// `krvirt server`: the API server and controllers, without a host agent.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// State directory (the embedded store's file lives here)
    #[arg(long, env = "KRVIRT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API listen address
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Store: `embedded` (a file in the data dir) or `etcd://HOST:PORT[,HOST:PORT…]`
    /// (several servers may share one etcd: one leads and runs the controllers)
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Leader lease TTL in seconds (etcd store): a dead leader is replaced within it
    #[arg(long, default_value_t = 5)]
    pub leader_ttl: i64,
    /// Serve plain HTTP without authentication (ONLY for measuring the
    /// cost of authentication: bench/api)
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// `krvirt agent`: the host agent of one host, talking to the server given
/// by the global `--server`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// VM run directories
    #[arg(long, env = "KRVIRT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve this host's Prometheus `/metrics` (per-VM figures) on this address
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// One-time join token (krvirt token create --join): fetch this host's
    /// client certificate from an https:// --server (once; kept in DATA/agent-pki)
    #[arg(long, env = "KRVIRT_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// The server's CA certificate (its DATA/pki/ca.crt), for joining
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Address of this host's API for the server (console, console log,
    /// pause; mutual TLS with the joined certificate)
    /// [default: 0.0.0.0:8186, or an ephemeral port when that is taken]
    #[arg(long, env = "KRVIRT_HOST_API_LISTEN")]
    pub host_api_listen: Option<SocketAddr>,
    /// Do not start the fencing watchdog process (which kills this host's
    /// guests when the agent is dead and its lease runs out)
    #[arg(long, env = "KRVIRT_NO_FENCE_WATCHDOG")]
    pub no_fence_watchdog: bool,
    #[command(flatten)]
    pub host: HostArgs,
}

/// The audit log of a data directory (`krvirt audit verify` reads it).
pub fn audit_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
}

fn open_audit(data_dir: &Path) -> Result<krvirt_server::audit::AuditLog> {
    let path = audit_path(data_dir);
    krvirt_server::audit::AuditLog::open(&path)
        .with_context(|| format!("opening the audit log {}", path.display()))
}

pub(crate) fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/krvirt")
    } else {
        home().join(".local/share/krvirt")
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn cache_dir(arg: &Option<PathBuf>) -> PathBuf {
    arg.clone()
        .or_else(|| std::env::var_os("KRVIRT_CACHE_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("krvirt")))
        .unwrap_or_else(|| home().join(".cache/krvirt"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
        .to_ascii_lowercase()
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn parse_taints(taints: &[String]) -> Result<Vec<krvirt_api::kubevirt::Taint>> {
    taints
        .iter()
        .map(|t| {
            let a = krvirt_api::kubevirt::scheduling::parse_taint_arg(t)
                .map_err(|e| anyhow::anyhow!("--taint {e}"))?;
            match (a.remove, a.effect) {
                (false, Some(effect)) => Ok(krvirt_api::kubevirt::Taint {
                    key: a.key,
                    value: a.value,
                    effect,
                    time_added: None,
                }),
                _ => anyhow::bail!("--taint {t:?}: expected KEY[=VALUE]:EFFECT"),
            }
        })
        .collect()
}

/// Hold an exclusive lock on the data directory for the process lifetime,
/// so two instances never share one store.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("krvirt.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another krvirt is already using {} (lock {} is held); give this one its own --data-dir",
            dir.display(),
            path.display()
        );
    }
    Ok(f)
}

/// The API server's way to the in-process agent.
struct LocalHost(Agent);

/// The agent's per-VM figures as a `/metrics` source.
struct AgentMetrics(Agent);

#[async_trait]
impl krvirt_server::MetricsSource for AgentMetrics {
    async fn collect(&self) -> Box<dyn krvirt_server::metrics::Collector> {
        Box::new(self.0.metrics().await)
    }
}

fn host_err(e: AgentError, vmi: &Value) -> ApiError {
    let name = vmi
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match e {
        AgentError::NotRunningHere(_) => ApiError::Conflict {
            group: "kubevirt.io".into(),
            resource: "virtualmachineinstances".into(),
            name,
            message: "the VMI is not running".into(),
        },
        other => ApiError::Internal(other.to_string()),
    }
}

#[async_trait]
impl HostConnector for LocalHost {
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.0.pause(vmi).await.map_err(|e| host_err(e, vmi))
    }
    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.0.unpause(vmi).await.map_err(|e| host_err(e, vmi))
    }
    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError> {
        let s = self.0.console(vmi).await.map_err(|e| host_err(e, vmi))?;
        Ok(Box::new(s))
    }
    async fn console_log(&self, vmi: &Value, follow: bool) -> Result<ByteStream, ApiError> {
        let s = self
            .0
            .console_log(vmi, follow)
            .map_err(|e| host_err(e, vmi))?;
        Ok(Box::pin(s))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn open_images(data_dir: &Path, host: &HostArgs) -> Result<Arc<ImageStore>> {
    let cache = cache_dir(&host.cache_dir);
    let demo = krvirt_image::ensure_demo_images(&cache.join("demo"))
        .with_context(|| format!("building the demo guest images in {}", cache.display()))?;
    let store = ImageStore::with_demo_images(&data_dir.join("images"), demo)
        .context("opening the image store")?;
    Ok(Arc::new(store))
}

fn agent_config(data_dir: &Path, host: &HostArgs) -> Result<AgentConfig> {
    let mut cfg = AgentConfig::new(host.node_name.clone().unwrap_or_else(hostname), data_dir);
    cfg.accel_mode = host
        .accel
        .parse::<AccelMode>()
        .with_context(|| "--accel".to_string())?;
    cfg.labels = parse_labels(&host.labels)?;
    cfg.taints = parse_taints(&host.taints)?;
    cfg.qemu_user = (host.qemu_user != "root").then(|| host.qemu_user.clone());
    cfg.cgroup_parent = host.cgroup_parent.clone();
    Ok(cfg)
}

const DEMO_VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: demo
  labels:
    kubevirt.io/vm: demo
spec:
  runStrategy: Always
  template:
    metadata:
      labels:
        kubevirt.io/vm: demo
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
          - name: cloudinitdisk
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 5
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo "hello from the krvirt demo VM"
"#;

/// Wait until the Host `name` reports Ready, at most `timeout`.
async fn wait_host_ready(registry: &Registry, name: &str, timeout: Duration) {
    let Some(kind) = krvirt_api::find_kind("hosts") else {
        return;
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(h) = registry.get(kind, "", name).await {
            let ready = h
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
            if ready {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// FNV-1a of a path, for names derived from the data directory.
fn path_hash(p: &Path) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

/// IPv4 routes of this host as (network, mask), from /proc/net/route.
fn host_routes() -> Vec<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
            Some((hex(f.get(1)?)?, hex(f.get(7)?)?))
        })
        .filter(|(_, mask)| *mask != 0)
        .collect()
}

/// The `default` Network's /24 for data dir `data_dir`: in 10.200.0.0 -
/// 10.249.255.0, starting at a point derived from the path (so instances
/// side by side differ), skipping any subnet that overlaps a route of this
/// host.
fn default_subnet(data_dir: &Path) -> std::net::Ipv4Addr {
    let routes = host_routes();
    let h = path_hash(data_dir);
    let n = 50 * 256;
    (0..n)
        .map(|i| {
            let k = (h % n + i) % n;
            std::net::Ipv4Addr::new(10, 200 + (k / 256) as u8, (k % 256) as u8, 0)
        })
        .find(|net| {
            let a = u32::from(*net);
            routes
                .iter()
                .all(|(r, m)| (a & m) != (r & m) && (a & 0xffff_ff00) != (r & 0xffff_ff00))
        })
        .unwrap_or(std::net::Ipv4Addr::new(10, 213, 0, 0))
}

/// Create the `default` Network (type nat) unless it exists: the network
/// KubeVirt's `pod` interfaces attach to. Its bridge is named from the data
/// directory (`kvd` + 8 hex digits) and its subnet avoids the host's routes.
async fn ensure_default_network(registry: &Registry, data_dir: &Path) -> Result<()> {
    let kind = krvirt_api::find_kind("networks").context("Network kind")?;
    if registry
        .get(kind, "", krvirt_api::network::DEFAULT_NETWORK)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let subnet = default_subnet(data_dir);
    let net = serde_json::json!({
        "apiVersion": "krvirt.io/v1",
        "kind": "Network",
        "metadata": {"name": krvirt_api::network::DEFAULT_NETWORK},
        "spec": {
            "type": "nat",
            "subnet": format!("{subnet}/24"),
            "bridge": format!("kvd{:08x}", path_hash(data_dir)),
        }
    });
    match registry.create(kind, "", net).await {
        Ok(_) => info!(%subnet, "created the default NAT Network (the pod network)"),
        Err(ApiError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e).context("creating the default Network"),
    }
    Ok(())
}

/// Create the demo VM once, on the first start of a data directory.
async fn create_demo(registry: &Registry, data_dir: &Path) -> Result<()> {
    let marker = data_dir.join(".demo-created");
    if marker.exists() {
        return Ok(());
    }
    let vm: Value = serde_saphyr::from_str(DEMO_VM).context("demo VM manifest")?;
    let kind = krvirt_api::find_kind("vm").context("VirtualMachine kind")?;
    match registry.create(kind, "default", vm).await {
        Ok(_) => info!("created the demo VM `demo` (krvirt get vms)"),
        Err(ApiError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e).context("creating the demo VM"),
    }
    std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    Ok(())
}

/// `krvirt up`: everything for one host in one process.
pub async fn up(args: UpArgs) -> Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let _lock = lock_data_dir(&data_dir)?;
    let store = open_store(&args.store, &data_dir).await?;
    let registry = Registry::new(Arc::new(krvirt_server::InstrumentedStore::new(
        store.clone(),
    )));
    let auth_stop = CancellationToken::new();
    let secure = crate::secure::listen(
        &data_dir,
        args.listen,
        &registry,
        args.insecure_no_auth,
        &auth_stop,
    )
    .await?;
    let api_url = secure.url();
    if !args.no_default_network {
        ensure_default_network(&registry, &data_dir).await?;
    }

    let images = open_images(&data_dir, &args.host)?;
    // The in-process agent is the local admin: the unix socket.
    let client = krvirt_client::Client::new(&secure.socket_url())?;
    let agent = Agent::new(agent_config(&data_dir, &args.host)?, client, images.clone())
        .context("starting the host agent")?;
    let image_svc = crate::images::ImageService::new(
        images,
        registry.clone(),
        agent.node_name().to_string(),
        data_dir.join("run").join("vmi"),
    );
    let accel = agent.accelerator().clone();

    let shutdown = CancellationToken::new();
    // Its own host in-process; joined agents' hosts through their host API.
    let local: Arc<dyn HostConnector> = Arc::new(LocalHost(agent.clone()));
    let connector: Arc<dyn HostConnector> = match secure.remote_connector(&registry)? {
        Some(remote) => Arc::new(krvirt_server::remote::SplitConnector::new(
            agent.node_name(),
            local,
            Arc::new(remote),
        )),
        None => local,
    };
    let state = AppState::new(registry.clone(), connector)
        .with_metrics_source(Arc::new(AgentMetrics(agent.clone())))
        .with_audit(open_audit(&data_dir)?);
    let server = {
        let shutdown = shutdown.clone();
        let images = crate::images::routes(image_svc.clone());
        tokio::spawn(async move { crate::secure::serve(secure, state, images, shutdown).await })
    };
    tokio::spawn(image_svc.clone().mirror_loop(shutdown.clone()));
    // On etcd, `up` shares the store with other servers (and `up`s): it
    // runs the controllers only while it holds the leader lease, as
    // `krvirt server` does.
    let ctl = tokio::spawn(run_controllers(
        registry.clone(),
        store,
        is_etcd(&args.store).then(|| {
            (
                format!(
                    "up {}@{} (pid {})",
                    agent.node_name(),
                    args.listen,
                    std::process::id()
                ),
                args.leader_ttl,
            )
        }),
        shutdown.clone(),
    ));
    let agent_task = tokio::spawn(agent.clone().run(shutdown.clone()));

    if !args.no_demo {
        // Create the demo once this host is registered and Ready, so its
        // first placement finds a host (bounded: placement retries anyway).
        wait_host_ready(&registry, agent.node_name(), Duration::from_secs(15)).await;
        create_demo(&registry, &data_dir).await?;
    }
    info!(
        api = %api_url,
        data_dir = %data_dir.display(),
        host = agent.node_name(),
        accelerator = accel.accel.qemu_name(),
        reason = %accel.reason,
        "krvirt is up"
    );
    eprintln!(
        "krvirt is up: API {api_url} (and {}), data {}, host {}, accelerator {} ({})",
        crate::secure::socket_path(&data_dir).display(),
        data_dir.display(),
        agent.node_name(),
        accel.accel.qemu_name(),
        accel.reason
    );

    tokio::select! {
        _ = shutdown_signal() => info!("shutting down; guests keep running"),
        r = agent_task => {
            match r {
                Ok(Err(e)) => warn!(error = %e, "the host agent stopped"),
                Err(e) => warn!(error = %e, "the host agent panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
    shutdown.cancel();
    auth_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ctl).await;
    Ok(())
}

/// `krvirt server`: API server and controllers over the embedded store.
pub async fn server(args: ServerArgs) -> Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let _lock = lock_data_dir(&data_dir)?;
    let store = open_store(&args.store, &data_dir).await?;
    let registry = Registry::new(Arc::new(krvirt_server::InstrumentedStore::new(
        store.clone(),
    )));
    let shutdown = CancellationToken::new();
    let secure = crate::secure::listen(
        &data_dir,
        args.listen,
        &registry,
        args.insecure_no_auth,
        &shutdown,
    )
    .await?;
    let connector: Arc<dyn HostConnector> = match secure.remote_connector(&registry)? {
        Some(remote) => Arc::new(remote),
        None => Arc::new(krvirt_server::NoHostConnector),
    };
    let state = AppState::new(registry.clone(), connector).with_audit(open_audit(&data_dir)?);
    // On etcd several servers may run: only the elected leader runs the
    // controllers (and so the scheduler).
    let ctl = tokio::spawn(run_controllers(
        registry,
        store,
        is_etcd(&args.store).then(|| {
            (
                format!("server {}@{}", std::process::id(), args.listen),
                args.leader_ttl,
            )
        }),
        shutdown.clone(),
    ));
    eprintln!(
        "krvirt server listening on {} and {}{}",
        secure.url(),
        secure.socket.display(),
        secure
            .ca_fingerprint
            .as_deref()
            .map(|f| format!(", CA SHA-256 {f}"))
            .unwrap_or_default()
    );
    let sd = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        sd.cancel();
    });
    crate::secure::serve(secure, state, axum::Router::new(), shutdown.clone()).await?;
    let _ = ctl.await;
    Ok(())
}

/// `krvirt agent`: one host's agent against a server.
pub async fn agent(args: AgentArgs, server: Option<String>) -> Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let _lock = lock_data_dir(&data_dir)?;
    let images = open_images(&data_dir, &args.host)?;
    let mut cfg = agent_config(&data_dir, &args.host)?;
    let https = server.as_deref().is_some_and(|s| s.starts_with("https://"));
    let client = crate::secure::agent_client(
        &data_dir,
        server,
        &cfg.node_name,
        args.join_token.clone(),
        args.ca.clone(),
    )
    .await?;
    // The host API needs the certificate of a join (a TLS server).
    let host_api = if https {
        let pki = data_dir.join("agent-pki");
        if crate::hostapi::can_serve(&pki, &cfg.node_name)? {
            let tls = crate::hostapi::tls_config(&pki)?;
            let listener = crate::hostapi::bind(args.host_api_listen).await?;
            cfg.host_api_port = Some(listener.local_addr()?.port());
            Some((listener, tls))
        } else {
            warn!(
                dir = %pki.display(),
                "this host's certificate predates the host API (no server name {}): the server cannot reach its consoles; re-join (remove the directory, new join token)",
                cfg.node_name
            );
            None
        }
    } else {
        warn!(
            "not joined to a TLS server: no host API (the server cannot reach this host's consoles)"
        );
        None
    };
    let agent = Agent::new(cfg, client, images)?;
    if let Some((listener, tls)) = host_api {
        eprintln!(
            "krvirt agent host API on https://{} (mutual TLS)",
            listener.local_addr()?
        );
        let a = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::hostapi::serve(a, listener, tls).await {
                warn!(error = %e, "the host API stopped");
            }
        });
    }
    if !args.no_fence_watchdog {
        crate::fence_watchdog::spawn(&data_dir)?;
    }
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        sd.cancel();
    });
    if let Some(addr) = args.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
        eprintln!(
            "krvirt agent metrics on http://{}/metrics",
            listener.local_addr()?
        );
        let sources: Vec<Arc<dyn krvirt_server::MetricsSource>> =
            vec![Arc::new(AgentMetrics(agent.clone()))];
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                krvirt_server::metrics::serve_metrics(listener, sources, sd.cancelled_owned()).await
            {
                warn!(error = %e, "the metrics listener stopped");
            }
        });
    }
    agent.run(shutdown).await?;
    Ok(())
}

/// Is `--store` an etcd address?
fn is_etcd(spec: &str) -> bool {
    spec.starts_with("etcd://")
}

/// Open the `--store`: `embedded` (DATA/state.db) or `etcd://HOST:PORT[,…]`.
async fn open_store(spec: &str, data_dir: &Path) -> Result<Arc<dyn krvirt_store::Store>> {
    if spec == "embedded" {
        let store = EmbeddedStore::open(&data_dir.join("state.db"))
            .with_context(|| format!("opening the store in {}", data_dir.display()))?;
        return Ok(Arc::new(store));
    }
    if is_etcd(spec) {
        let store = krvirt_store::etcd::EtcdStore::connect_url(spec)
            .await
            .with_context(|| format!("--store {spec}: connecting to etcd"))?;
        return Ok(Arc::new(store));
    }
    bail!("--store {spec}: expected `embedded` or etcd://HOST:PORT[,HOST:PORT…]")
}

/// The election key of the servers sharing one store.
const LEADER_KEY: &str = "/krvirt/leader/controllers";

/// Run the controllers until `shutdown`; with `elect = Some((identity,
/// ttl))` only while this server holds the leader lease.
async fn run_controllers(
    registry: Registry,
    store: Arc<dyn krvirt_store::Store>,
    elect: Option<(String, i64)>,
    shutdown: CancellationToken,
) {
    let Some((identity, ttl)) = elect else {
        match krvirt_controller::Controllers::new(registry) {
            Ok(c) => c.run(shutdown).await,
            Err(e) => warn!(error = %e, "cannot start the controllers"),
        }
        return;
    };
    let mut election = krvirt_store::election::Election::start(store, LEADER_KEY, &identity, ttl);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = election.until_leader() => {}
        }
        eprintln!("krvirt {identity}: leader: running the controllers and the scheduler");
        let token = shutdown.child_token();
        let task = match krvirt_controller::Controllers::new(registry.clone()) {
            Ok(c) => tokio::spawn(c.run(token.clone())),
            Err(e) => {
                warn!(error = %e, "cannot start the controllers");
                break;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = election.until_not_leader() => {
                eprintln!("krvirt {identity}: no longer leader: controllers stopped");
            }
        }
        token.cancel();
        let _ = task.await;
        if shutdown.is_cancelled() {
            break;
        }
    }
    election.resign().await;
}
