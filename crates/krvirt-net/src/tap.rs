//! Persistent tap devices, created by krvirt with `TUNSETIFF` (QEMU only
//! opens them by name and needs no privileges to create devices).
//!
//! Flags: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; `TUNSETOWNER` hands the
//! device to the user QEMU runs as; `TUNSETPERSIST` keeps it after our fd
//! is closed. Names are a pure function of the VMI uid and NIC index
//! ([`tap_name`]) so the agent finds them again after a restart and can
//! sweep those whose VMI is gone ([`sweep`]).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::error::{NetError, invalid, io_err};

/// Every tap krvirt creates starts with this.
pub const TAP_PREFIX: &str = "kvt";
/// Linux interface names hold at most 15 bytes.
pub const IFNAMSIZ_MAX: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tunsetpersist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);
nix::ioctl_write_int_bad!(
    tunsetowner,
    nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>())
);

/// The tap name of NIC `index` of the VMI with uid `vmi_uid`:
/// `kvt` + the first 10 hex digits of the uid (dashes dropped) + the index
/// in hex, e.g. `kvt0a1b2c3d00` + `0`. At most 15 bytes for any index < 256.
pub fn tap_name(vmi_uid: &str, index: usize) -> Result<String, NetError> {
    let hex: String = vmi_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .take(10)
        .collect();
    if hex.len() < 10 {
        return Err(invalid(
            "vmi uid",
            format!("{vmi_uid:?} has fewer than 10 hex digits"),
        ));
    }
    let name = format!("{TAP_PREFIX}{hex}{index:x}");
    if name.len() > IFNAMSIZ_MAX {
        return Err(invalid("nic index", format!("{index} is too large")));
    }
    Ok(name)
}

/// The uid prefix encoded in a tap name made by [`tap_name`], if it is one.
pub fn uid_prefix_of(tap: &str) -> Option<&str> {
    let rest = tap.strip_prefix(TAP_PREFIX)?;
    (rest.len() > 10 && rest.is_char_boundary(10)).then(|| &rest[..10])
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    if name.is_empty()
        || name.len() > IFNAMSIZ_MAX
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid("interface name", format!("{name:?}")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    Ok(req)
}

fn attach(name: &str) -> Result<std::fs::File, NetError> {
    let req = ifreq(name)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(io_err("open", TUN_PATH))?;
    // SAFETY: f is an open /dev/net/tun fd, req a valid ifreq.
    unsafe { tunsetiff(f.as_raw_fd(), &req) }.map_err(|e| io_err("TUNSETIFF", name)(e.into()))?;
    Ok(f)
}

/// Create (or take over) the persistent tap `name`, owned by `owner_uid`
/// (the user QEMU runs as). Idempotent: an existing tap of that name with
/// the same flags is reused.
pub fn create(name: &str, owner_uid: u32) -> Result<(), NetError> {
    let f = attach(name)?;
    // SAFETY: f holds the tap; the argument is passed by value.
    unsafe { tunsetowner(f.as_raw_fd(), owner_uid as libc::c_int) }
        .map_err(|e| io_err("TUNSETOWNER", name)(e.into()))?;
    // SAFETY: as above.
    unsafe { tunsetpersist(f.as_raw_fd(), 1) }
        .map_err(|e| io_err("TUNSETPERSIST", name)(e.into()))?;
    Ok(())
}

/// Delete the persistent tap `name`. A tap that does not exist is not an
/// error; one still held open by QEMU is removed when QEMU closes it.
pub fn delete(name: &str) -> Result<(), NetError> {
    if !exists(name) {
        return Ok(());
    }
    let f = attach(name)?;
    // SAFETY: f holds the tap.
    unsafe { tunsetpersist(f.as_raw_fd(), 0) }
        .map_err(|e| io_err("TUNSETPERSIST", name)(e.into()))?;
    Ok(())
}

/// Whether an interface called `name` exists.
pub fn exists(name: &str) -> bool {
    !name.contains('/') && std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Every krvirt tap on the host (names starting with [`TAP_PREFIX`]).
pub fn list() -> Result<Vec<String>, NetError> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir("/sys/class/net").map_err(io_err("read", "/sys/class/net"))?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TAP_PREFIX)
            && std::path::Path::new("/sys/class/net")
                .join(&name)
                .join("tun_flags")
                .exists()
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Delete every krvirt tap for which `owned` is true and whose uid prefix
/// is not in `live_uids` (uids of VMIs that still exist on this host). The
/// agent owns every tap (`|_| true`); tests restrict it to their own.
/// Returns the names removed.
pub fn sweep(
    live_uids: &[String],
    mut owned: impl FnMut(&str) -> bool,
) -> Result<Vec<String>, NetError> {
    let live: HashSet<String> = live_uids
        .iter()
        .filter_map(|u| tap_name(u, 0).ok())
        .filter_map(|n| uid_prefix_of(&n).map(str::to_string))
        .collect();
    let mut removed = Vec::new();
    for name in list()? {
        if owned(&name) && uid_prefix_of(&name).is_some_and(|p| !live.contains(p)) {
            delete(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_short() {
        let uid = "0a1b2c3d-4e5f-4000-8000-000000000017";
        assert_eq!(tap_name(uid, 0).unwrap(), "kvt0a1b2c3d4e0");
        assert_eq!(tap_name(uid, 11).unwrap(), "kvt0a1b2c3d4eb");
        assert_eq!(tap_name(uid, 255).unwrap().len(), IFNAMSIZ_MAX);
        assert!(tap_name(uid, 256).is_err());
        assert!(tap_name("short", 0).is_err());
        assert_eq!(uid_prefix_of("kvt0a1b2c3d4e0"), Some("0a1b2c3d4e"));
        assert_eq!(uid_prefix_of("eth0"), None);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        assert!(ifreq("").is_err());
        assert!(ifreq("a/b").is_err());
        assert!(ifreq("0123456789abcdef").is_err());
        assert!(ifreq("tap0").is_ok());
    }
}
