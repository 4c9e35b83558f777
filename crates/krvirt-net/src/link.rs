//! Bridges, link state and addresses over rtnetlink. Reads (does a link
//! exist, its index) go through sysfs; every change is a netlink request.

use std::net::Ipv4Addr;
use std::path::Path;

use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::error::{NetError, invalid};

/// A netlink session (its connection task runs on the current tokio runtime).
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nl(op: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let name = name.to_string();
    move |e| NetError::Netlink {
        op,
        name,
        message: e.to_string(),
    }
}

/// The kernel index of interface `name`, if it exists.
pub fn index(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The bridge `port` is attached to, if any.
pub fn master_of(port: &str) -> Option<String> {
    let target = std::fs::read_link(Path::new("/sys/class/net").join(port).join("master")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn check_name(name: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > crate::tap::IFNAMSIZ_MAX
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("interface name", format!("{name:?}")));
    }
    Ok(())
}

impl Netlink {
    /// Open a netlink session. Needs a tokio runtime.
    pub fn connect() -> Result<Netlink, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Io {
            op: "netlink socket",
            name: String::new(),
            source,
        })?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    /// The underlying rtnetlink handle (for this crate's other modules).
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    fn need(&self, name: &str) -> Result<u32, NetError> {
        index(name).ok_or_else(|| NetError::Netlink {
            op: "lookup",
            name: name.to_string(),
            message: "no such interface".into(),
        })
    }

    /// Create bridge `name` if it does not exist (with `nf_call_iptables`
    /// on, so bridged IPv4 traffic meets krvirt's `inet` firewall and
    /// conntrack), and set it up. Returns its index.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32, NetError> {
        check_name(name)?;
        if index(name).is_none() {
            let msg = LinkBridge::new(name).nf_call_iptables(true).build();
            match self.handle.link().add(msg).execute().await {
                Ok(()) => {}
                // Lost a race with another creator: fine if it is there now.
                Err(e) if index(name).is_some() => {
                    tracing::debug!(bridge = name, error = %e, "bridge appeared concurrently");
                }
                Err(e) => return Err(nl("add bridge", name)(e)),
            }
        }
        let idx = self.need(name)?;
        self.set_up(name).await?;
        Ok(idx)
    }

    /// Set `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let idx = self.need(name)?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl("set up", name))
    }

    /// Attach `port` to `bridge` and set it up.
    pub async fn attach(&self, port: &str, bridge: &str) -> Result<(), NetError> {
        let p = self.need(port)?;
        let b = self.need(bridge)?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(p).controller(b).up().build())
            .execute()
            .await
            .map_err(nl("attach", port))
    }

    /// Give `name` the hardware address `mac` (`aa:bb:cc:dd:ee:ff`);
    /// nothing to do when it has it already.
    pub async fn ensure_mac(&self, name: &str, mac: &str) -> Result<(), NetError> {
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|p| u8::from_str_radix(p, 16))
            .collect::<Result<_, _>>()
            .ok()
            .filter(|b: &Vec<u8>| b.len() == 6 && mac.len() == 17)
            .ok_or_else(|| invalid("mac address", format!("{mac:?}")))?;
        let idx = self.need(name)?;
        let current =
            std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("address"))
                .unwrap_or_default();
        if current.trim().eq_ignore_ascii_case(mac) {
            return Ok(());
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(idx).address(bytes).build())
            .execute()
            .await
            .map_err(nl("set address", name))
    }

    /// Give `name` the MTU `mtu`; nothing to do when it has it already.
    pub async fn ensure_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let idx = self.need(name)?;
        let current = std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("mtu"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if current == Some(mtu) {
            return Ok(());
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(idx).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl("set mtu", name))
    }

    /// Make sure `addr/prefix` is on `name` (idempotent).
    pub async fn ensure_address(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let idx = self.need(name)?;
        self.handle
            .address()
            .add(idx, addr.into(), prefix)
            .replace()
            .execute()
            .await
            .map_err(nl("add address", name))
    }

    /// Delete interface `name`; one that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        let Some(idx) = index(name) else {
            return Ok(());
        };
        match self.handle.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(_) if index(name).is_none() => Ok(()),
            Err(e) => Err(nl("delete", name)(e)),
        }
    }
}
