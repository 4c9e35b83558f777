//! Multi-host harness: every host is a network namespace on this machine
//! with a veth pair to a test bridge in the root namespace and its own
//! `krvirt agent` (own data dir and host name); `krvirt server` listens on
//! the bridge's address. Names (bridge, namespaces, veths) and the /24 are
//! unique per test, so tests run in parallel; the [`Cluster`]'s Drop kills
//! the agents and their QEMUs and removes namespaces, links and dirs.
//! Needs root and `ip` (iproute2): missing, the test fails loudly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, Instance, cache_dir, free_port, kill_processes_under, tail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Run `ip ARGS` (optionally in a namespace); panic with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One host: a network namespace running `krvirt agent`.
pub struct Host {
    pub name: String,
    /// Network namespace.
    pub ns: String,
    /// Address on the test bridge.
    pub ip: String,
    /// Root-namespace end of the veth pair.
    pub veth: String,
    /// The agent's data dir.
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The server as the agent reaches it.
    agent_url: String,
    /// One-time join token and the server's CA (a TLS server).
    join: Option<(String, PathBuf)>,
    env: Vec<(String, String)>,
    /// Extra `krvirt agent` arguments (`--label`, `--taint`...).
    extra_args: Vec<String>,
    /// (this host's own directory, the path where its agent sees it): a
    /// bind mount in the agent's mount namespace (see
    /// [`Cluster::start_with_host_local_dir`]).
    local_dir: Option<(PathBuf, PathBuf)>,
}

impl Host {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This host's own directory behind the common host-local path, as
    /// the test (root mount namespace) reaches it.
    pub fn local_dir(&self) -> &std::path::Path {
        &self
            .local_dir
            .as_ref()
            .expect("the cluster was started with a host-local directory")
            .0
    }

    /// `kill -9` the agent (its guests keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The console log file of a VMI uid on this host (read from disk;
    /// bytes that are not UTF-8, e.g. a guest echoing random disk
    /// content, do not hide the rest).
    pub fn console_file(&self, uid: &str) -> String {
        std::fs::read(self.data_dir.join("run/vmi").join(uid).join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Link state of this host's network: down cuts it off the cluster.
    pub fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.veth, if up { "up" } else { "down" }]);
    }

    fn spawn_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        if let Some((own, common)) = &self.local_dir {
            // `ip netns exec` runs in a new mount namespace (slave of the
            // root one): the bind mount is the agent's (and its QEMUs')
            // only.
            cmd.args([
                "sh",
                "-c",
                r#"mount --bind "$1" "$2" || exit 1; shift 2; exec "$@""#,
                "sh",
            ])
            .arg(own)
            .arg(common);
        }
        cmd.arg(BIN)
            .args(["--server", &self.agent_url, "agent", "--accel", "tcg"]);
        if let Some((token, ca)) = &self.join {
            // The certificate is kept in the data dir: later starts need no token.
            cmd.args(["--join-token", token]).arg("--ca").arg(ca);
        }
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--node-name", &self.name])
            .args(&self.extra_args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("KRVIRT_CACHE_DIR", cache_dir())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start krvirt agent in its namespace");
        self.child = Some(child);
    }
}

/// A server and `n` namespaced hosts.
pub struct Cluster {
    pub hosts: Vec<Host>,
    pub bridge: String,
    /// `10.A.B` of the test /24.
    pub prefix: String,
    /// The API server (a `krvirt server` on the bridge address); its temp
    /// dir also holds the hosts' data dirs.
    pub server: Instance,
}

fn subnet_in_use(prefix: &str) -> bool {
    let out = Command::new("ip")
        .args(["-4", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.contains(&format!(" {prefix}."))
}

impl Cluster {
    /// Build the network, start the server and `n` agents, wait until all
    /// hosts are Ready.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[]).await
    }

    /// [`Cluster::start`] with extra environment for the server and the
    /// agents (e.g. short leases: `KRVIRT_HOST_LEASE_SECONDS`,
    /// `KRVIRT_HEARTBEAT_INTERVAL_MS`).
    pub async fn start_with(n: usize, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_with_agent_args(&vec![Vec::new(); n], env).await
    }

    /// [`Cluster::start_with`], one host per entry of `agent_args`, host i
    /// started with the extra `krvirt agent` arguments `agent_args[i]`
    /// (e.g. `--label disk=ssd`, `--taint maint=yes:NoSchedule`).
    pub async fn start_with_agent_args(
        agent_args: &[Vec<String>],
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_inner(agent_args, env, None).await
    }

    /// [`Cluster::start`] where every host has its own directory at one
    /// common path, [`Cluster::local_path`] (`DIR/{name}`): host i's
    /// `DIR/host{i}-{name}` bind-mounted there in its agent's mount
    /// namespace, as a local disk every host mounts at the same place.
    pub async fn start_with_host_local_dir(n: usize, name: &str) -> Cluster {
        Cluster::start_inner(&vec![Vec::new(); n], &[], Some(name)).await
    }

    /// The common path of the hosts' own directories.
    pub fn local_path(&self) -> PathBuf {
        self.hosts[0]
            .local_dir
            .as_ref()
            .expect("the cluster was started with a host-local directory")
            .1
            .clone()
    }

    async fn start_inner(
        agent_args: &[Vec<String>],
        env: &[(&str, &str)],
        local_dir: Option<&str>,
    ) -> Cluster {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(
            nix_is_root(),
            "the multi-host harness needs root (network namespaces)"
        );
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:x}{:x}", std::process::id() & 0xfff, seq & 0xf);
        // A /24 nobody uses: 10.(200..250).(0..250).0
        let mut k = (std::process::id().wrapping_mul(31).wrapping_add(seq * 7919)) % 12_500;
        let prefix = loop {
            let p = format!("10.{}.{}", 200 + k / 250, k % 250);
            if !subnet_in_use(&p) {
                break p;
            }
            k = (k + 1) % 12_500;
        };
        let bridge = format!("kvtb{id}");
        let dir = tempfile::Builder::new()
            .prefix("krvirt-cluster-")
            .tempdir()
            .unwrap();

        let mut guard = NetGuard {
            bridge: bridge.clone(),
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);

        let mut hosts = Vec::new();
        for (i, extra_args) in agent_args.iter().enumerate() {
            let ns = format!("kvt-{id}-{i}");
            let veth = format!("kvv{id}{i}");
            let peer = format!("kvp{id}{i}");
            let host_ip = format!("{prefix}.{}", 10 + i);
            ip(&["netns", "add", &ns]);
            guard.namespaces.push(ns.clone());
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            guard.veths.push(veth.clone());
            ip(&["link", "set", &peer, "netns", &ns]);
            ip(&["link", "set", &veth, "master", &bridge]);
            ip(&["link", "set", &veth, "up"]);
            ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{prefix}.1"),
            ]);
            let data_dir = dir.path().join(format!("host{i}"));
            std::fs::create_dir_all(&data_dir).unwrap();
            let local_dir = local_dir.map(|name| {
                let own = dir.path().join(format!("host{i}-{name}"));
                let common = dir.path().join(name);
                std::fs::create_dir_all(&own).unwrap();
                std::fs::create_dir_all(&common).unwrap();
                (own, common)
            });
            hosts.push(Host {
                name: format!("host{i}"),
                ns,
                ip: host_ip,
                veth,
                log: dir.path().join(format!("agent-host{i}.log")),
                data_dir,
                child: None,
                agent_url: String::new(),
                join: None,
                env: env.clone(),
                extra_args: extra_args.clone(),
                local_dir,
            });
        }

        // The server on the bridge address; its data dir is the Instance's.
        let port = free_port();
        let listen = format!("{prefix}.1:{port}");
        let server_data = dir.path().join("data");
        let log_path = dir.path().join("up.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(BIN)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["server", "--listen", &listen])
            .arg("--data-dir")
            .arg(&server_data)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start krvirt server");
        // A server with TLS says so and opens its local admin socket; the
        // tests then talk to it over that socket and the agents join with
        // a one-time token and the server's CA.
        let sock = server_data.join("krvirt.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        let tls = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("listening on https://") && sock.exists() {
                break true;
            }
            if log.contains("listening on http://") {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "krvirt server did not start:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let (server, agent_url) = if tls {
            (
                Instance::from_server_process(dir, format!("unix://{}", sock.display()), child),
                format!("https://{listen}"),
            )
        } else {
            let url = format!("http://{listen}");
            (Instance::from_server_process(dir, url.clone(), child), url)
        };
        let mut cluster = Cluster {
            hosts,
            bridge,
            prefix,
            server,
        };
        // From here on the cluster's Drop cleans the network.
        std::mem::forget(guard);
        for i in 0..cluster.hosts.len() {
            let join = tls.then(|| {
                (
                    cluster
                        .server
                        .ok(&["token", "create", "--join"])
                        .trim()
                        .to_string(),
                    server_data.join("pki/ca.crt"),
                )
            });
            cluster.hosts[i].agent_url = agent_url.clone();
            cluster.hosts[i].join = join;
            cluster.hosts[i].spawn_agent();
        }
        let names: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
        for name in names {
            cluster
                .wait_host_ready(&name, Duration::from_secs(180))
                .await;
        }
        cluster
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this cluster"))
    }

    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this cluster"))
    }

    /// Start a host's agent again (after [`Host::kill_agent`]).
    pub fn restart_agent(&mut self, name: &str) {
        self.host_mut(name).spawn_agent();
    }

    /// Everything the server and agents logged (tails), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- server ---\n{}\n", tail(&self.server.log(), 40));
        for h in &self.hosts {
            s += &format!("--- agent {} ---\n{}\n", h.name, tail(&h.log(), 40));
        }
        s
    }

    pub async fn wait_host_ready(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(h) = self
                .server
                .get(&format!("/apis/krvirt.io/v1/hosts/{name}"))
                .await
                && host_ready(&h)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "host {name} not Ready in time\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until `f` returns Some; on timeout, panic with every log.
    pub async fn until<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The host a VMI is bound to.
    pub async fn node_of(&self, vmi: &str) -> Option<String> {
        let v = self.server.vmi(vmi).await?;
        v.pointer("/status/nodeName")?.as_str().map(str::to_string)
    }
}

pub fn host_ready(h: &Value) -> bool {
    h.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes the network of a cluster that failed half-way through start.
struct NetGuard {
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

impl Drop for NetGuard {
    fn drop(&mut self) {
        remove_net(&self.bridge, &self.namespaces, &self.veths);
    }
}

fn remove_net(bridge: &str, namespaces: &[String], veths: &[String]) {
    for v in veths {
        ip_quiet(&["link", "del", v]);
    }
    for ns in namespaces {
        ip_quiet(&["netns", "del", ns]);
    }
    ip_quiet(&["link", "del", bridge]);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.kill_agent();
        }
        // Agents' QEMUs live under the cluster dir (the hosts' data dirs).
        kill_processes_under(self.server.dir.path());
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let namespaces: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        let veths: Vec<String> = self.hosts.iter().map(|h| h.veth.clone()).collect();
        remove_net(&self.bridge, &namespaces, &veths);
    }
}
