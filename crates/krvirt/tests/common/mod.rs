//! Harness for end-to-end tests: a real `krvirt up` per test (own data dir
//! and port), real QEMU guests under TCG, driven through the CLI and the
//! REST API. QEMU outlives krvirt by design, so the harness kills every QEMU
//! whose command line points into the instance's data dir when it drops.

#![allow(dead_code)]

pub mod cluster;
pub mod registry;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_krvirt");

/// The KubeVirt example corpus.
pub fn corpus(file: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/kubevirt-examples")
        .join(file);
    assert!(
        p.exists(),
        "the KubeVirt corpus is needed at {}",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Demo images are built once per machine and shared by every instance.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KRVIRT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("krvirt-test-cache"))
}

/// Marker file in an instance's temp dir: start it with the default Network.
const WITH_NETWORK: &str = "with-default-network";

pub struct Instance {
    pub dir: tempfile::TempDir,
    pub url: String,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Instance {
    /// Start `krvirt up` and wait until its host is registered.
    pub async fn start() -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("krvirt-e2e-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut inst = Instance {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            child: None,
            http: reqwest::Client::new(),
        };
        inst.spawn();
        inst.wait_ready().await;
        inst
    }

    /// An instance for a server process started elsewhere (the multi-host
    /// harness starts `krvirt server` itself); `dir` is its temp dir.
    pub fn from_server_process(dir: tempfile::TempDir, url: String, child: Child) -> Instance {
        let http = match url.strip_prefix("unix://") {
            Some(sock) => reqwest::Client::builder()
                .unix_socket(PathBuf::from(sock))
                .build()
                .unwrap(),
            None => reqwest::Client::new(),
        };
        Instance {
            dir,
            url,
            child: Some(child),
            http,
        }
    }

    /// Start `krvirt up` WITH the `default` NAT Network, so `pod`
    /// interfaces sit on a real bridge with DHCP from dnsmasq (plain
    /// [`Instance::start`] passes `--no-default-network`: QEMU user
    /// networking, cheaper for tests that do not look at the network).
    pub async fn start_with_network() -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("krvirt-e2e-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join(WITH_NETWORK), b"").unwrap();
        let port = free_port();
        let mut inst = Instance {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            child: None,
            http: reqwest::Client::new(),
        };
        inst.spawn();
        inst.wait_ready().await;
        inst
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The instance's TCP port (TLS), remembered across restarts.
    pub fn port(&self) -> u16 {
        let f = self.dir.path().join("port");
        if let Ok(p) = std::fs::read_to_string(&f) {
            return p.trim().parse().unwrap();
        }
        let p = self.url.rsplit(':').next().unwrap().to_string();
        std::fs::write(&f, &p).unwrap();
        p.parse().unwrap()
    }

    /// `https://127.0.0.1:PORT`: the network listener (TLS, tokens).
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port())
    }

    /// The instance's CA certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir().join("pki/ca.crt")
    }

    /// `krvirt token create ARGS` through the unix socket: the token.
    pub fn token(&self, args: &[&str]) -> String {
        let mut a = vec!["token", "create"];
        a.extend_from_slice(args);
        self.ok(&a).trim().to_string()
    }

    /// Full URL of an API path for `self.http` (the unix socket).
    fn api(&self, path: &str) -> String {
        format!("http://localhost{path}")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("up.log"))
            .unwrap();
        let port = self.port().to_string();
        // Tests reach the instance as its local admin: the unix socket
        // (`--server unix://…` for CLI verbs, `self.http` for REST).
        let sock = self.data_dir().join("krvirt.sock");
        self.url = format!("unix://{}", sock.display());
        self.http = reqwest::Client::builder()
            .unix_socket(sock)
            .build()
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "up",
                "--no-demo",
                "--accel",
                "tcg",
                "--node-name",
                "e2e-host",
            ])
            .args((!self.dir.path().join(WITH_NETWORK).exists()).then_some("--no-default-network"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KRVIRT_CACHE_DIR", cache_dir())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start krvirt up");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("krvirt up exited with {st}:\n{}", self.log());
            }
            if let Ok(v) = self.get("/apis/krvirt.io/v1/hosts").await
                && v["items"].as_array().is_some_and(|a| !a.is_empty())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "krvirt up not ready in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9` the krvirt process (its guests keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Start krvirt again on the same data dir and port.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(self.api(path))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let code = r.status();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if code.is_success() {
            Ok(v)
        } else {
            Err(format!("{code}: {v}"))
        }
    }

    /// GET a path as the local admin: (status, content type, body).
    pub async fn get_raw(&self, path: &str) -> (u16, String, String) {
        let r = self.http.get(self.api(path)).send().await.unwrap();
        let code = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (code, ct, r.text().await.unwrap_or_default())
    }

    /// POST/PUT a body; returns (status code, JSON body).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let r = self
            .http
            .request(method, self.api(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// Run a client verb against this instance.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--server")
            .arg(&self.url)
            .env_remove("KRVIRT_TOKEN")
            .env_remove("KRVIRT_CA")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run krvirt")
    }

    /// Run a client verb that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "krvirt {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn vmi(&self, name: &str) -> Option<Value> {
        self.get(&format!(
            "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/{name}"
        ))
        .await
        .ok()
    }

    pub async fn vm(&self, name: &str) -> Option<Value> {
        self.get(&format!(
            "/apis/kubevirt.io/v1/namespaces/default/virtualmachines/{name}"
        ))
        .await
        .ok()
    }

    /// Wait until `f` returns Some, polling the API.
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
                "timed out waiting for {what}\n--- krvirt log (tail) ---\n{}",
                tail(&self.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The VMI once it is Running: (uid, QEMU pid).
    pub async fn running_vmi(&self, name: &str, not_uid: Option<&str>) -> (String, u32) {
        self.until(
            &format!("VMI {name} Running"),
            Duration::from_secs(120),
            || async {
                let v = self.vmi(name).await?;
                let uid = v["metadata"]["uid"].as_str()?.to_string();
                if Some(uid.as_str()) == not_uid {
                    return None;
                }
                if v["status"]["phase"] != "Running" {
                    return None;
                }
                let pid = v["status"]["krvirtRuntime"]["pid"].as_u64()? as u32;
                Some((uid, pid))
            },
        )
        .await
    }

    /// The serial console log of a VMI (through the API).
    pub async fn console_log(&self, name: &str) -> String {
        let r = self
            .http
            .get(self.api(&format!(
                "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachineinstances/{name}/consolelog"
            )))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// The console log file of a VMI uid, read from disk (works while krvirt is down).
    pub fn console_file(&self, uid: &str) -> String {
        // Lossy: one byte the guest printed that is not UTF-8 must not hide
        // the whole log.
        std::fs::read(
            self.data_dir()
                .join("run/vmi")
                .join(uid)
                .join("console.log"),
        )
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
    }

    /// Wait until the VMI's console shows `needle`.
    /// Types `commands` on `vm`'s serial console through `krvirt console`,
    /// lets the guest answer for `settle`, leaves with Ctrl-] and returns
    /// what the console printed.
    pub async fn console_type(&self, vm: &str, commands: &str, settle: Duration) -> String {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(["--server", &self.url, "console", vm])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let stdin = child.stdin.as_mut().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            stdin
                .write_all(format!("\n{commands}\n").as_bytes())
                .unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(settle);
            stdin.write_all(&[0x1d]).unwrap();
        }
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn console_shows(&self, name: &str, needle: &str) -> String {
        self.until(
            &format!("{needle:?} on {name}'s console"),
            Duration::from_secs(120),
            || async {
                let log = self.console_log(name).await;
                log.contains(needle).then_some(log)
            },
        )
        .await
    }
}

/// Highest `TICK n` in a console log.
pub fn last_tick(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// Kill every process whose command line mentions `dir`.
pub fn kill_processes_under(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            // SAFETY: sending a signal to a pid; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Remove the cgroups of the instance's guests (their QEMUs were killed
/// with everything else under the instance's directory).
pub fn remove_vm_cgroups(data_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(data_dir.join("run/vmi")) else {
        return;
    };
    for d in dirs.flatten() {
        let _ = krvirt_hypervisor::release(&krvirt_hypervisor::RunPaths::in_dir(d.path()));
    }
}

/// Remove what the instance's agent set up on the host (its record in
/// `DATA/net/host.json`): taps still on its bridges, the bridges, its nft
/// tables. Its dnsmasq went with [`kill_processes_under`].
pub fn remove_host_network(data_dir: &Path) {
    let Ok(text) = std::fs::read(data_dir.join("net/host.json")) else {
        return;
    };
    let Ok(host) = serde_json::from_slice::<Value>(&text) else {
        return;
    };
    let ip = |args: &[&str]| {
        let _ = Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    for br in host["bridges"].as_array().into_iter().flatten() {
        let Some(br) = br.as_str() else { continue };
        if let Ok(ports) = std::fs::read_dir(Path::new("/sys/class/net").join(br).join("brif")) {
            for p in ports.flatten() {
                ip(&["link", "del", &p.file_name().to_string_lossy()]);
            }
        }
        ip(&["link", "del", br]);
    }
    if let Some(t) = host["table"].as_str() {
        for (family, name) in [
            ("inet", t.to_string()),
            ("bridge", t.to_string()),
            ("ip", format!("{t}-nat")),
        ] {
            let _ = Command::new("nft")
                .args(["delete", "table", family, &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
        kill_processes_under(self.dir.path());
        remove_host_network(&self.data_dir());
        remove_vm_cgroups(&self.data_dir());
        if std::thread::panicking() {
            eprintln!("--- krvirt log ---\n{}", tail(&self.log(), 80));
            // KRVIRT_E2E_KEEP=1 keeps the data dir and full log for a look.
            if std::env::var_os("KRVIRT_E2E_KEEP").is_some() {
                let kept =
                    std::env::temp_dir().join(format!("krvirt-e2e-kept-{}", std::process::id()));
                let _ = std::fs::rename(self.dir.path(), &kept);
                eprintln!("kept {}", kept.display());
            }
        }
    }
}
