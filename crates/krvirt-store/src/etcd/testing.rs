//! Real etcd processes for tests (this crate's and other crates'): a
//! single member or a cluster on loopback ports, data in a temporary
//! directory (on /dev/shm when there is one, etcd fsyncs a lot), killed
//! and removed on drop.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary (Debian's `etcd-server`), or `$KRVIRT_ETCD`.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("KRVIRT_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members. Dropping it kills every
/// member and removes the data.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// One member.
    pub fn single() -> io::Result<EtcdCluster> {
        Self::start(1)
    }

    /// `n` members, all up and serving when this returns.
    pub fn start(n: usize) -> io::Result<EtcdCluster> {
        Self::start_in(n, None)
    }

    /// `n` members with their data under `base` (default: /dev/shm when
    /// present, else the system temp dir). Benchmarks put it on the same
    /// file system as the store they compare against.
    pub fn start_in(n: usize, base: Option<&Path>) -> io::Result<EtcdCluster> {
        let bin = etcd_binary();
        if !bin.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} not found: install Debian's etcd-server (scripts/packages.txt)",
                    bin.display()
                ),
            ));
        }
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(n, base) {
                Ok(c) => return Ok(c),
                // A port taken between choosing and binding: try others.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn try_start(n: usize, base: Option<&Path>) -> io::Result<EtcdCluster> {
        let shm = Path::new("/dev/shm");
        let dir = if let Some(base) = base {
            tempfile::Builder::new()
                .prefix("krvirt-etcd-")
                .tempdir_in(base)?
        } else if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("krvirt-etcd-")
                .tempdir_in(shm)?
        } else {
            tempfile::Builder::new().prefix("krvirt-etcd-").tempdir()?
        };
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "krvirt-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("x")
        );
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.wait_serving(i, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))?;
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_serving(&mut self, i: usize, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let port = self.members[i].client_port;
        loop {
            if let Some(child) = self.members[i].child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "etcd member {i} exited with {status}; log: {}",
                    self.log(i)
                )));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "etcd member {i} not serving on port {port} after {timeout:?}; log: {}",
                    self.log(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of member `i`'s log (for failure messages).
    pub fn log(&self, i: usize) -> String {
        let path = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or("").to_string()
    }

    /// `http://127.0.0.1:PORT` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,…` (the `--store` syntax).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// SIGKILL member `i` (its data stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data and ports.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_serving(i, Duration::from_secs(30))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
