//! Typed errors of the networking crate.

use std::io;

/// Anything that can go wrong configuring host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("{op} {name}: {source}")]
    Io {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink {op} {name}: {message}")]
    Netlink {
        op: &'static str,
        name: String,
        message: String,
    },
    #[error("{program} failed: {message}")]
    Command { program: String, message: String },
    #[error("store: {0}")]
    Store(#[from] krvirt_store::StoreError),
    #[error("network {network} has no free address in {pool}")]
    Exhausted { network: String, pool: String },
    #[error("address {ip} in network {network} is already allocated to {owner}")]
    Taken {
        network: String,
        ip: std::net::Ipv4Addr,
        owner: String,
    },
}

pub(crate) fn invalid(what: &'static str, message: impl Into<String>) -> NetError {
    NetError::Invalid {
        what,
        message: message.into(),
    }
}

pub(crate) fn io_err(
    op: &'static str,
    name: impl Into<String>,
) -> impl FnOnce(io::Error) -> NetError {
    let name = name.into();
    move |source| NetError::Io { op, name, source }
}
