//! DHCP for a network: one `dnsmasq` (Debian `dnsmasq-base`) per bridge,
//! DNS off, serving ONLY the MAC -> address pairs IPAM allocated
//! (`--dhcp-range=NET,static` + `--dhcp-hostsfile`, reloaded with SIGHUP).
//! Why dnsmasq rather than our own DHCP server: it is a proven, tiny
//! implementation (relay, renewals, option handling, broadcast quirks of
//! old clients) and the addresses still come from our IPAM, so the store
//! stays the only source of truth; it runs daemonized with a pidfile in
//! the network's state directory, so it survives a `kill -9` of krvirt and
//! is adopted again.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{NetError, invalid, io_err};
use crate::ipam::Cidr;

/// One network's DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpServer {
    pub bridge: String,
    pub subnet: Cidr,
    /// Handed out as the router (`None`: isolated network, no router).
    pub router: Option<Ipv4Addr>,
    /// State directory (hosts file, leases, pidfile, log).
    pub dir: PathBuf,
}

/// A static lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
}

impl DhcpServer {
    pub fn hosts_file(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }

    /// Pid of our running dnsmasq for this directory, if any.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let marker = format!("--pid-file={}", self.pid_file().display());
        (cmdline.contains("dnsmasq") && cmdline.contains(&marker)).then_some(pid)
    }

    /// Write the static leases (atomically) and make a running server
    /// re-read them.
    pub fn set_leases(&self, leases: &[Lease]) -> Result<(), NetError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err("create", self.dir.display().to_string()))?;
        let mut body = String::new();
        for l in leases {
            if !self.subnet.is_host(l.ip) || l.mac.len() != 17 || l.mac.contains(',') {
                return Err(invalid("lease", format!("{} {}", l.mac, l.ip)));
            }
            body.push_str(&format!("{},{}\n", l.mac.to_lowercase(), l.ip));
        }
        let f = self.hosts_file();
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(io_err("write", tmp.display().to_string()))?;
        std::fs::rename(&tmp, &f).map_err(io_err("rename", f.display().to_string()))?;
        if let Some(pid) = self.pid() {
            // SIGHUP re-reads --dhcp-hostsfile.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
        Ok(())
    }

    /// Start dnsmasq on the bridge unless ours already runs. The bridge
    /// must exist and carry an address in the subnet.
    pub fn ensure_running(&self) -> Result<i32, NetError> {
        if let Some(pid) = self.pid() {
            return Ok(pid);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err("create", self.dir.display().to_string()))?;
        if !self.hosts_file().exists() {
            self.set_leases(&[])?;
        }
        let mask = Ipv4Addr::from(self.subnet.mask());
        let mut cmd = Command::new("dnsmasq");
        cmd.arg("--conf-file=/dev/null")
            .arg("--port=0")
            .arg("--user=root")
            .arg(format!("--interface={}", self.bridge))
            .arg("--except-interface=lo")
            .arg("--bind-dynamic")
            .arg("--dhcp-authoritative")
            .arg(format!(
                "--dhcp-range={},static,{mask},1h",
                self.subnet.network()
            ))
            .arg(format!("--dhcp-hostsfile={}", self.hosts_file().display()))
            .arg(format!(
                "--dhcp-leasefile={}",
                self.dir.join("leases").display()
            ))
            .arg(format!("--pid-file={}", self.pid_file().display()))
            .arg(format!(
                "--log-facility={}",
                self.dir.join("dnsmasq.log").display()
            ));
        match self.router {
            Some(r) => cmd.arg(format!("--dhcp-option=option:router,{r}")),
            None => cmd.arg("--dhcp-option=option:router"),
        };
        let out = cmd.output().map_err(|e| NetError::Command {
            program: "dnsmasq".into(),
            message: format!("cannot run dnsmasq (Debian package dnsmasq-base): {e}"),
        })?;
        if !out.status.success() {
            return Err(NetError::Command {
                program: "dnsmasq".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        // It daemonizes after writing the pidfile.
        for _ in 0..50 {
            if let Some(pid) = self.pid() {
                return Ok(pid);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(NetError::Command {
            program: "dnsmasq".into(),
            message: format!("no pid in {} after start", self.pid_file().display()),
        })
    }

    /// Stop our dnsmasq, if it runs.
    pub fn stop(&self) -> Result<(), NetError> {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(self.pid_file());
        Ok(())
    }
}
