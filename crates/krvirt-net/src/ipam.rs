//! Address management in the store. Every allocated address is one key,
//! `/ipam/{network}/{a.b.c.d}`, created with the store's create-if-absent
//! (`Store::create` fails with `AlreadyExists`), so two allocators racing
//! for the same address cannot both win: the loser moves to the next one.
//! The value names the owner (`{vmi uid}/{interface}`) and the MAC.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use krvirt_store::{Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::error::{NetError, invalid};

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    /// Usable host address (not the network or broadcast address).
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network() && ip != self.broadcast()
    }
    /// The `n`th host address (1-based: `nth_host(1)` is network + 1).
    pub fn nth_host(&self, n: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from(u32::from(self.network()).checked_add(n)?);
        self.is_host(ip).then_some(ip)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Cidr, NetError> {
        let bad = || invalid("CIDR", format!("{s:?} is not a.b.c.d/len (len 0..=32)"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let c = Cidr { addr, prefix };
        if c.network() != addr {
            return Err(invalid("CIDR", format!("{s:?} has host bits set")));
        }
        Ok(c)
    }
}

/// The addresses a network hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Network name (store key component).
    pub network: String,
    pub subnet: Cidr,
    /// Never allocated.
    pub gateway: Ipv4Addr,
    /// Dynamic range, inclusive.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Pool {
    /// A pool over the whole subnet minus the gateway, or over `range`.
    pub fn new(
        network: &str,
        subnet: Cidr,
        gateway: Ipv4Addr,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Result<Pool, NetError> {
        if network.is_empty() || network.contains('/') {
            return Err(invalid("network name", format!("{network:?}")));
        }
        if !(8..=30).contains(&subnet.prefix) {
            return Err(invalid(
                "subnet",
                format!("{subnet}: a network needs a prefix of 8..=30"),
            ));
        }
        if !subnet.is_host(gateway) {
            return Err(invalid(
                "gateway",
                format!("{gateway} is not a host address in {subnet}"),
            ));
        }
        let (first, last) = match range {
            Some(r) => r,
            None => (
                subnet
                    .nth_host(1)
                    .ok_or_else(|| invalid("subnet", "too small"))?,
                Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
            ),
        };
        if !subnet.is_host(first) || !subnet.is_host(last) || u32::from(first) > u32::from(last) {
            return Err(invalid(
                "dhcp range",
                format!("{first}-{last} is not a range of host addresses in {subnet}"),
            ));
        }
        Ok(Pool {
            network: network.to_string(),
            subnet,
            gateway,
            first,
            last,
        })
    }

    fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

/// One allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub network: String,
    pub ip: Ipv4Addr,
    /// `{vmi uid}/{interface}`.
    pub owner: String,
    #[serde(default)]
    pub mac: Option<String>,
    /// Reserved explicitly (a static address) rather than picked from the pool.
    #[serde(default)]
    pub reserved: bool,
}

/// IPAM over any [`Store`].
pub struct Ipam<S: Store + ?Sized> {
    store: Arc<S>,
}

impl<S: Store + ?Sized> Clone for Ipam<S> {
    fn clone(&self) -> Self {
        Ipam {
            store: self.store.clone(),
        }
    }
}

fn prefix(network: &str) -> String {
    format!("/ipam/{network}/")
}

fn owner_hash(owner: &str) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in owner.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

impl<S: Store + ?Sized> Ipam<S> {
    pub fn new(store: Arc<S>) -> Self {
        Ipam { store }
    }

    /// Every allocation in `network`.
    pub async fn list(&self, network: &str) -> Result<Vec<Allocation>, NetError> {
        let (kvs, _) = self.store.list(&prefix(network)).await?;
        let mut out = Vec::new();
        for kv in kvs {
            match serde_json::from_slice::<Allocation>(&kv.value) {
                Ok(a) => out.push(a),
                Err(e) => tracing::warn!(key = kv.key, error = %e, "unreadable IPAM entry"),
            }
        }
        Ok(out)
    }

    async fn try_create(&self, a: &Allocation) -> Result<bool, NetError> {
        let key = format!("{}{}", prefix(&a.network), a.ip);
        let value = serde_json::to_vec(a).map_err(|e| invalid("allocation", e.to_string()))?;
        match self.store.create(&key, value, None).await {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The address of `owner` in the pool's network: the one it already
    /// has, else a free one from the dynamic range. Safe against any number
    /// of concurrent allocators on the same store.
    pub async fn allocate(
        &self,
        pool: &Pool,
        owner: &str,
        mac: Option<&str>,
    ) -> Result<Ipv4Addr, NetError> {
        let existing = self.list(&pool.network).await?;
        if let Some(a) = existing.iter().find(|a| a.owner == owner) {
            return Ok(a.ip);
        }
        let taken: std::collections::HashSet<Ipv4Addr> = existing.iter().map(|a| a.ip).collect();
        let size = pool.size();
        // Start at a point derived from the owner so concurrent allocators
        // mostly try different addresses; walk the whole range once.
        let start = owner_hash(owner) % size;
        for i in 0..size {
            let ip = Ipv4Addr::from(u32::from(pool.first) + (start + i) % size);
            if ip == pool.gateway || taken.contains(&ip) {
                continue;
            }
            let a = Allocation {
                network: pool.network.clone(),
                ip,
                owner: owner.to_string(),
                mac: mac.map(str::to_string),
                reserved: false,
            };
            if self.try_create(&a).await? {
                return Ok(ip);
            }
        }
        Err(NetError::Exhausted {
            network: pool.network.clone(),
            pool: format!("{}-{}", pool.first, pool.last),
        })
    }

    /// Reserve `ip` for `owner` (a static address). Idempotent for the
    /// same owner; `Taken` if someone else has it.
    pub async fn reserve(
        &self,
        pool: &Pool,
        ip: Ipv4Addr,
        owner: &str,
        mac: Option<&str>,
    ) -> Result<(), NetError> {
        if !pool.subnet.is_host(ip) || ip == pool.gateway {
            return Err(invalid(
                "address",
                format!("{ip} is not a free host address of {}", pool.subnet),
            ));
        }
        let a = Allocation {
            network: pool.network.clone(),
            ip,
            owner: owner.to_string(),
            mac: mac.map(str::to_string),
            reserved: true,
        };
        if self.try_create(&a).await? {
            return Ok(());
        }
        let key = format!("{}{}", prefix(&pool.network), ip);
        let holder = self
            .store
            .get(&key)
            .await?
            .and_then(|kv| serde_json::from_slice::<Allocation>(&kv.value).ok());
        match holder {
            Some(h) if h.owner == owner => Ok(()),
            Some(h) => Err(NetError::Taken {
                network: pool.network.clone(),
                ip,
                owner: h.owner,
            }),
            // Released between our create and get: try once more.
            None => {
                if self.try_create(&a).await? {
                    Ok(())
                } else {
                    Err(NetError::Taken {
                        network: pool.network.clone(),
                        ip,
                        owner: "unknown".into(),
                    })
                }
            }
        }
    }

    /// Release every address in `network` whose owner starts with
    /// `owner_prefix` (a VMI uid releases all its interfaces). Returns how
    /// many were released.
    pub async fn release(&self, network: &str, owner_prefix: &str) -> Result<usize, NetError> {
        let (kvs, _) = self.store.list(&prefix(network)).await?;
        let mut n = 0;
        for kv in kvs {
            let Ok(a) = serde_json::from_slice::<Allocation>(&kv.value) else {
                continue;
            };
            if a.owner.starts_with(owner_prefix) {
                match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                    Ok(_) => n += 1,
                    Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_arithmetic() {
        let c: Cidr = "10.88.0.0/24".parse().unwrap();
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 88, 0, 255));
        assert!(c.is_host(Ipv4Addr::new(10, 88, 0, 1)));
        assert!(!c.is_host(Ipv4Addr::new(10, 88, 0, 0)));
        assert!(!c.is_host(Ipv4Addr::new(10, 88, 1, 1)));
        assert_eq!(c.nth_host(254), Some(Ipv4Addr::new(10, 88, 0, 254)));
        assert_eq!(c.nth_host(255), None);
        assert!("10.88.0.1/24".parse::<Cidr>().is_err());
        assert!("10.88.0.0/33".parse::<Cidr>().is_err());
        assert_eq!("10.88.0.7/32".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().mask(), 0);
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn pools_check_their_ranges() {
        let c: Cidr = "10.88.0.0/24".parse().unwrap();
        let gw = Ipv4Addr::new(10, 88, 0, 1);
        let p = Pool::new("n", c, gw, None).unwrap();
        assert_eq!(p.size(), 254);
        assert!(Pool::new("n", c, Ipv4Addr::new(10, 9, 0, 1), None).is_err());
        let r = (Ipv4Addr::new(10, 88, 0, 50), Ipv4Addr::new(10, 88, 0, 40));
        assert!(Pool::new("n", c, gw, Some(r)).is_err());
        assert!(Pool::new("a/b", c, gw, None).is_err());
        assert!(Pool::new("n", "10.0.0.0/31".parse().unwrap(), gw, None).is_err());
    }
}
