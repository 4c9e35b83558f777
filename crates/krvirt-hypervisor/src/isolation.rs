//! What an unprivileged QEMU needs from the host: its user, access to the
//! files it opens, and vCPU pinning.
//!
//! - [`QemuUser`]: the account QEMU runs as (`krvirt-qemu` by default, a
//!   system user with no shell and no home), created idempotently with
//!   `useradd` ([`QemuUser::ensure`]).
//! - File access without loosening anything for other users: a file QEMU
//!   writes is handed to it (`chown`, like libvirt's DAC driver); a file it
//!   only reads, and every directory on the way to either, gets a POSIX
//!   ACL entry for that one uid when its mode does not already let it in
//!   ([`grant`]).
//! - CPU lists (`0-2,5`) and `sched_setaffinity` of vCPU threads
//!   ([`pin_thread`]); [`allowed_cpus`] reads any thread's affinity.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Default name of the account QEMU runs as.
pub const DEFAULT_QEMU_USER: &str = "krvirt-qemu";

/// Errors of the isolation helpers.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("user {name:?} does not exist")]
    NoSuchUser { name: String },
    #[error("useradd {name} failed: {stderr}")]
    UserAdd { name: String, stderr: String },
    #[error("{0:?} is not a CPU list (like 0-3,6)")]
    CpuList(String),
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> IsolationError {
    let context = context.into();
    move |source| IsolationError::Io { context, source }
}

/// The account QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl QemuUser {
    /// Looks the user up (`getpwnam`); `Ok(None)` if there is none.
    pub fn lookup(name: &str) -> Result<Option<QemuUser>, IsolationError> {
        let u = nix::unistd::User::from_name(name)
            .map_err(|e| io_ctx(format!("looking up user {name}"))(e.into()))?;
        Ok(u.map(|u| QemuUser {
            name: name.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }))
    }

    /// Looks the user up and creates it if missing: a system account with
    /// its own group, no home directory and no login shell.
    pub fn ensure(name: &str) -> Result<QemuUser, IsolationError> {
        if let Some(u) = QemuUser::lookup(name)? {
            return Ok(u);
        }
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "krvirt QEMU processes",
                name,
            ])
            .output()
            .map_err(io_ctx("running useradd"))?;
        // Exit 9: created concurrently by someone else.
        if !out.status.success() && out.status.code() != Some(9) {
            return Err(IsolationError::UserAdd {
                name: name.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        QemuUser::lookup(name)?.ok_or_else(|| IsolationError::NoSuchUser {
            name: name.to_string(),
        })
    }
}

// ----- POSIX ACLs ---------------------------------------------------------------

const ACL_XATTR: &str = "system.posix_acl_access";
const ACL_VERSION: u32 = 2;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// Tag of an ACL entry (values of the Linux xattr format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum AclTag {
    UserObj = 0x01,
    User = 0x02,
    GroupObj = 0x04,
    Group = 0x08,
    Mask = 0x10,
    Other = 0x20,
}

/// One ACL entry: tag, id (named user/group only), rwx bits (4/2/1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AclEntry {
    pub tag: AclTag,
    pub id: u32,
    pub perm: u16,
}

/// An access ACL, entries sorted by tag then id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(pub Vec<AclEntry>);

impl Acl {
    /// The minimal ACL equivalent to a file mode.
    pub fn from_mode(mode: u32) -> Acl {
        let e = |tag, shift: u32| AclEntry {
            tag,
            id: ACL_UNDEFINED_ID,
            perm: ((mode >> shift) & 7) as u16,
        };
        Acl(vec![
            e(AclTag::UserObj, 6),
            e(AclTag::GroupObj, 3),
            e(AclTag::Other, 0),
        ])
    }

    /// Parses the `system.posix_acl_access` xattr value.
    pub fn parse(bytes: &[u8]) -> Option<Acl> {
        let (head, rest) = bytes.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*head) != ACL_VERSION || rest.len() % 8 != 0 {
            return None;
        }
        let mut v = Vec::new();
        for c in rest.chunks_exact(8) {
            let tag = match u16::from_le_bytes([c[0], c[1]]) {
                0x01 => AclTag::UserObj,
                0x02 => AclTag::User,
                0x04 => AclTag::GroupObj,
                0x08 => AclTag::Group,
                0x10 => AclTag::Mask,
                0x20 => AclTag::Other,
                _ => return None,
            };
            v.push(AclEntry {
                tag,
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            });
        }
        Some(Acl(v))
    }

    /// The xattr value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = ACL_VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            out.extend_from_slice(&(e.tag as u16).to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn get(&self, tag: AclTag) -> Option<&AclEntry> {
        self.0.iter().find(|e| e.tag == tag)
    }

    /// The rwx bits a process with `uid` and groups `gids` gets from a
    /// file owned by `owner:group` under this ACL (POSIX.1e algorithm).
    pub fn effective(&self, owner: u32, group: u32, uid: u32, gids: &[u32]) -> u16 {
        let mask = self.get(AclTag::Mask).map_or(7, |m| m.perm);
        if uid == owner {
            return self.get(AclTag::UserObj).map_or(0, |e| e.perm);
        }
        if let Some(e) = self.0.iter().find(|e| e.tag == AclTag::User && e.id == uid) {
            return e.perm & mask;
        }
        let mut matched = false;
        let mut perm = 0;
        for e in &self.0 {
            let hit = match e.tag {
                AclTag::GroupObj => gids.contains(&group),
                AclTag::Group => gids.contains(&e.id),
                _ => false,
            };
            if hit {
                matched = true;
                perm |= e.perm;
            }
        }
        if matched {
            return perm & mask;
        }
        self.get(AclTag::Other).map_or(0, |e| e.perm)
    }

    /// Adds `perm` for named user `uid` and widens the mask so it takes
    /// effect (the mask becomes the union of the group class, as setfacl
    /// computes it).
    pub fn grant_user(&mut self, uid: u32, perm: u16) {
        match self
            .0
            .iter_mut()
            .find(|e| e.tag == AclTag::User && e.id == uid)
        {
            Some(e) => e.perm |= perm,
            None => self.0.push(AclEntry {
                tag: AclTag::User,
                id: uid,
                perm,
            }),
        }
        let class = self
            .0
            .iter()
            .filter(|e| matches!(e.tag, AclTag::User | AclTag::GroupObj | AclTag::Group))
            .fold(0, |acc, e| acc | e.perm);
        self.0.retain(|e| e.tag != AclTag::Mask);
        self.0.push(AclEntry {
            tag: AclTag::Mask,
            id: ACL_UNDEFINED_ID,
            perm: class,
        });
        self.0.sort();
    }
}

fn read_acl(path: &Path, mode: u32) -> Result<Acl, IsolationError> {
    let cpath = cstring(path)?;
    let name = CString::new(ACL_XATTR).map_err(|e| io_ctx("xattr name")(io::Error::other(e)))?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: valid NUL-terminated strings; buf is writable for its length.
    let n = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(Acl::from_mode(mode)),
            _ => Err(io_ctx(format!("reading the ACL of {}", path.display()))(e)),
        };
    }
    buf.truncate(n as usize);
    Ok(Acl::parse(&buf).unwrap_or_else(|| Acl::from_mode(mode)))
}

fn write_acl(path: &Path, acl: &Acl) -> Result<(), IsolationError> {
    let cpath = cstring(path)?;
    let name = CString::new(ACL_XATTR).map_err(|e| io_ctx("xattr name")(io::Error::other(e)))?;
    let bytes = acl.to_bytes();
    // SAFETY: valid NUL-terminated strings; bytes is readable for its length.
    let r = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            name.as_ptr(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io_ctx(format!(
            "granting the QEMU user access to {} (POSIX ACL)",
            path.display()
        ))(io::Error::last_os_error()));
    }
    Ok(())
}

fn cstring(path: &Path) -> Result<CString, IsolationError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io_ctx(format!("path {}", path.display()))(io::Error::other(e)))
}

/// Whether `user` (and its primary group) gets `perm` on `path` now.
pub fn has_access(path: &Path, user: &QemuUser, perm: u16) -> Result<bool, IsolationError> {
    let md = std::fs::metadata(path).map_err(io_ctx(format!("stat {}", path.display())))?;
    let acl = read_acl(path, md.mode())?;
    Ok(acl.effective(md.uid(), md.gid(), user.uid, &[user.gid]) & perm == perm)
}

/// What QEMU does with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Opens it read-only: an ACL entry (r) if its mode does not allow it.
    Read,
    /// Opens it read-write (disk images): it becomes QEMU's (`chown`).
    ReadWrite,
}

/// Lets `user` open `path` as `access` says, and search every directory
/// above it. Returns the paths whose ACL was extended (for the log).
pub fn grant(path: &Path, user: &QemuUser, access: Access) -> Result<Vec<PathBuf>, IsolationError> {
    let mut changed = Vec::new();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_ctx("current directory"))?
            .join(path)
    };
    for dir in abs.ancestors().skip(1) {
        if !has_access(dir, user, 1)? {
            let md = std::fs::metadata(dir).map_err(io_ctx(format!("stat {}", dir.display())))?;
            let mut acl = read_acl(dir, md.mode())?;
            acl.grant_user(user.uid, 1);
            write_acl(dir, &acl)?;
            changed.push(dir.to_path_buf());
        }
    }
    match access {
        Access::ReadWrite => {
            nix::unistd::chown(
                &abs,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            )
            .map_err(|e| io_ctx(format!("chown {} to {}", abs.display(), user.name))(e.into()))?;
            // A copy of a read-only blob (a reflink clone of an image, say)
            // keeps mode 0444: root could write it anyway, its new owner
            // could not.
            let md = std::fs::metadata(&abs).map_err(io_ctx(format!("stat {}", abs.display())))?;
            if md.is_file() && md.mode() & 0o600 != 0o600 {
                std::fs::set_permissions(
                    &abs,
                    std::fs::Permissions::from_mode((md.mode() | 0o600) & 0o7777),
                )
                .map_err(io_ctx(format!("chmod u+rw {}", abs.display())))?;
            }
        }
        Access::Read => {
            if !has_access(&abs, user, 4)? {
                let md =
                    std::fs::metadata(&abs).map_err(io_ctx(format!("stat {}", abs.display())))?;
                let mut acl = read_acl(&abs, md.mode())?;
                acl.grant_user(user.uid, 4);
                write_acl(&abs, &acl)?;
                changed.push(abs.clone());
            }
        }
    }
    Ok(changed)
}

// ----- taps ----------------------------------------------------------------------

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tun_set_owner,
    nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>())
);

/// Makes `uid` the owner of the existing persistent tap `ifname`
/// (`TUNSETOWNER`), so an unprivileged QEMU can open it by name. The tap
/// must have been created with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
pub fn set_tap_owner(ifname: &str, uid: u32) -> Result<(), IsolationError> {
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    let ctx = |what: &str| format!("{what} on tap {ifname}");
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(IsolationError::Io {
            context: ctx("name"),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(io_ctx("opening /dev/net/tun"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: f is an open /dev/net/tun fd and req a valid ifreq.
    unsafe { tun_set_iff(f.as_raw_fd(), &req) }.map_err(|e| io_ctx(ctx("TUNSETIFF"))(e.into()))?;
    // SAFETY: f is attached to the tap; the argument is passed by value.
    unsafe { tun_set_owner(f.as_raw_fd(), uid as libc::c_int) }
        .map_err(|e| io_ctx(ctx("TUNSETOWNER"))(e.into()))?;
    Ok(())
}

// ----- CPUs ----------------------------------------------------------------------

/// Parses a kernel CPU list (`0-3,6`; empty = no CPU).
pub fn parse_cpu_list(s: &str) -> Result<BTreeSet<u32>, IsolationError> {
    let bad = || IsolationError::CpuList(s.to_string());
    let mut set = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a > b || b >= 65536 {
            return Err(bad());
        }
        set.extend(a..=b);
    }
    Ok(set)
}

/// Formats CPUs as a kernel CPU list (`0-3,6`).
pub fn format_cpu_list<'a>(cpus: impl IntoIterator<Item = &'a u32>) -> String {
    let set: BTreeSet<u32> = cpus.into_iter().copied().collect();
    let mut out: Vec<String> = Vec::new();
    let mut it = set.into_iter().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// Pins thread `tid` (0: the caller) to exactly `cpus`.
pub fn pin_thread(tid: i32, cpus: &BTreeSet<u32>) -> Result<(), IsolationError> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        if *c as usize >= libc::CPU_SETSIZE as usize {
            return Err(IsolationError::CpuList(format_cpu_list(cpus)));
        }
        // SAFETY: the index is below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(*c as usize, &mut set) };
    }
    // SAFETY: valid set of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        return Err(io_ctx(format!(
            "sched_setaffinity({tid}, {})",
            format_cpu_list(cpus)
        ))(io::Error::last_os_error()));
    }
    Ok(())
}

/// The CPUs thread `tid` (0: the caller) may run on.
pub fn allowed_cpus(tid: i32) -> Result<BTreeSet<u32>, IsolationError> {
    // SAFETY: as in pin_thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writable set of the size passed.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return Err(io_ctx(format!("sched_getaffinity({tid})"))(
            io::Error::last_os_error(),
        ));
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: every index is below CPU_SETSIZE.
        .filter(|c| unsafe { libc::CPU_ISSET(*c as usize, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        let s = parse_cpu_list("0-3,6,8-9\n").unwrap();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 6, 8, 9]
        );
        assert_eq!(format_cpu_list(&s), "0-3,6,8-9");
        assert_eq!(format_cpu_list(&parse_cpu_list("5").unwrap()), "5");
        assert!(parse_cpu_list("").unwrap().is_empty());
        for bad in ["a", "3-1", "1-", "-1", "1,,x"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn acl_round_trip_and_evaluation() {
        let acl = Acl::from_mode(0o750);
        assert_eq!(Acl::parse(&acl.to_bytes()), Some(acl.clone()));
        // Owner 0:0, mode 0750: uid 999 (group 999) gets nothing.
        assert_eq!(acl.effective(0, 0, 999, &[999]), 0);
        assert_eq!(acl.effective(0, 999, 5, &[999]), 5);
        assert_eq!(acl.effective(0, 0, 0, &[0]), 7);

        let mut g = acl.clone();
        g.grant_user(999, 1);
        assert_eq!(g.effective(0, 0, 999, &[999]), 1);
        // The mask is the union of the group class: group r-x stays r-x.
        assert_eq!(g.get(AclTag::Mask).unwrap().perm, 5);
        assert_eq!(g.effective(0, 0, 1000, &[0]), 5);
        // Others are untouched.
        assert_eq!(g.effective(0, 0, 1000, &[1000]), 0);
        g.grant_user(999, 4);
        assert_eq!(g.effective(0, 0, 999, &[999]), 5);
        assert_eq!(g.0.iter().filter(|e| e.tag == AclTag::User).count(), 1);
        assert_eq!(Acl::parse(&g.to_bytes()), Some(g.clone()));
        // Sorted by tag: user_obj, user, group_obj, mask, other.
        let tags: Vec<AclTag> = g.0.iter().map(|e| e.tag).collect();
        assert_eq!(
            tags,
            vec![
                AclTag::UserObj,
                AclTag::User,
                AclTag::GroupObj,
                AclTag::Mask,
                AclTag::Other
            ]
        );
        assert!(Acl::parse(&[1, 0, 0, 0]).is_none());
        assert!(Acl::parse(&[2, 0, 0, 0, 1]).is_none());
    }

    #[test]
    fn grant_on_a_real_file_system() {
        // Root only: the test runs as root here (the suite needs it).
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("private");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let ro = dir.join("kernel");
        std::fs::write(&ro, "k").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o600)).unwrap();
        let rw = dir.join("disk");
        std::fs::write(&rw, "d").unwrap();
        let user = QemuUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        assert!(!has_access(&dir, &user, 1).unwrap());
        let changed = grant(&ro, &user, Access::Read).unwrap();
        assert!(changed.contains(&dir), "{changed:?}");
        assert!(changed.contains(&ro), "{changed:?}");
        assert!(has_access(&dir, &user, 1).unwrap());
        assert!(
            !has_access(&dir, &user, 4).unwrap(),
            "search only, no listing"
        );
        assert!(has_access(&ro, &user, 4).unwrap());
        // Idempotent: nothing more to change.
        assert!(grant(&ro, &user, Access::Read).unwrap().is_empty());
        grant(&rw, &user, Access::ReadWrite).unwrap();
        let md = std::fs::metadata(&rw).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        // The mode of the directory still says 0700 to everyone else.
        let other = QemuUser {
            name: "other".into(),
            uid: 65533,
            gid: 65533,
        };
        assert!(!has_access(&dir, &other, 1).unwrap());
    }
}
