//! Per-VM control groups: CPU and memory limits, usage figures.
//!
//! Both hierarchies are supported and told apart at run time
//! ([`detect`]): cgroup v2 (one unified tree at `/sys/fs/cgroup`, with
//! `cgroup.controllers` at its root) and cgroup v1 (one tree per
//! controller, `/sys/fs/cgroup/{cpu,cpuacct,memory}`; a "hybrid" host that
//! mounts an empty v2 tree at `/sys/fs/cgroup/unified` counts as v1).
//!
//! Every VM gets a cgroup named after its run directory (the VMI uid)
//! under a parent, by default `krvirt` next to the agent's own cgroup
//! ([`Cgroups::host`]): on v1 inside the agent's cgroup of each controller,
//! on v2 beside it (a v2 cgroup that holds processes cannot hand
//! controllers down to children). QEMU joins the cgroup before it executes
//! (see [`crate::process::launch_with`]), so every byte it allocates is
//! charged there.
//!
//! What is written where is a pure function ([`VmCgroup::limit_writes`]),
//! unit-tested against fake roots; the real files are exercised by the
//! integration tests.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Resources;

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Default parent cgroup name (see the module documentation).
pub const DEFAULT_PARENT: &str = "krvirt";

/// CFS period used for CPU limits, in microseconds (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// v1 controllers krvirt uses, each its own hierarchy.
pub const V1_CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", "memory"];

/// v2 controllers krvirt enables for VM cgroups.
pub const V2_CONTROLLERS: [&str; 2] = ["cpu", "memory"];

/// Errors of the cgroup module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup file system at {root}: {reason}")]
    NotMounted { root: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup parent {0:?} must be a relative path without '..'")]
    BadParent(String),
    #[error("cannot find this process's {controller} cgroup in /proc/self/cgroup")]
    OwnCgroupUnknown { controller: String },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup hierarchy the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Tells v1 from v2 by looking at the mount point `root`.
pub fn detect(root: &Path) -> Result<CgroupVersion, CgroupError> {
    if root.join("cgroup.controllers").is_file() {
        return Ok(CgroupVersion::V2);
    }
    let missing: Vec<&str> = V1_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !root.join(c).join("cgroup.procs").is_file())
        .collect();
    if missing.is_empty() {
        Ok(CgroupVersion::V1)
    } else {
        Err(CgroupError::NotMounted {
            root: root.to_path_buf(),
            reason: format!(
                "no cgroup.controllers (v2) and v1 controller(s) {} not mounted",
                missing.join(", ")
            ),
        })
    }
}

/// The cgroup path (e.g. `/user.slice/x`) of `controller` in the text of
/// `/proc/self/cgroup`; on v2 the controller is ignored (the `0::` line).
pub fn own_cgroup(
    proc_self_cgroup: &str,
    version: CgroupVersion,
    controller: &str,
) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match version {
            CgroupVersion::V2 => id == "0" && ctrls.is_empty(),
            CgroupVersion::V1 => ctrls.split(',').any(|c| c == controller),
        };
        hit.then(|| path.to_string())
    })
}

fn check_relative(p: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(p.trim_start_matches('/'));
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(CgroupError::BadParent(p.to_string()));
    }
    Ok(path.to_path_buf())
}

/// The host's cgroup layout and where VM cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    pub version: CgroupVersion,
    /// Mount root (`/sys/fs/cgroup`).
    pub root: PathBuf,
    /// Parent directory of VM cgroups, per hierarchy: one entry on v2,
    /// one per [`V1_CONTROLLERS`] on v1 (absolute paths).
    pub parents: Vec<PathBuf>,
}

impl Cgroups {
    /// The layout at `root` for a process whose `/proc/self/cgroup` reads
    /// `proc_self_cgroup`. `parent`: an explicit parent path relative to
    /// the hierarchy root (`krvirt/vms`), or `None` for the default (see
    /// the module documentation).
    pub fn new(
        root: &Path,
        proc_self_cgroup: &str,
        parent: Option<&str>,
    ) -> Result<Cgroups, CgroupError> {
        let version = detect(root)?;
        let explicit = parent.map(check_relative).transpose()?;
        let parent_in =
            |tree: &Path, own: Option<String>, ctrl: &str| -> Result<PathBuf, CgroupError> {
                if let Some(p) = &explicit {
                    return Ok(tree.join(p));
                }
                let own = own.ok_or_else(|| CgroupError::OwnCgroupUnknown {
                    controller: ctrl.to_string(),
                })?;
                let own = check_relative(&own).map_err(|_| CgroupError::OwnCgroupUnknown {
                    controller: ctrl.to_string(),
                })?;
                let base = match version {
                    CgroupVersion::V1 => own,
                    // Beside our own cgroup (no internal processes on v2).
                    CgroupVersion::V2 => own.parent().map(Path::to_path_buf).unwrap_or_default(),
                };
                Ok(tree.join(base).join(DEFAULT_PARENT))
            };
        let parents = match version {
            CgroupVersion::V2 => vec![parent_in(
                root,
                own_cgroup(proc_self_cgroup, version, ""),
                "unified",
            )?],
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| parent_in(&root.join(c), own_cgroup(proc_self_cgroup, version, c), c))
                .collect::<Result<_, _>>()?,
        };
        Ok(Cgroups {
            version,
            root: root.to_path_buf(),
            parents,
        })
    }

    /// This host's layout ([`CGROUP_ROOT`], `/proc/self/cgroup`).
    pub fn host(parent: Option<&str>) -> Result<Cgroups, CgroupError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io_at(Path::new("/proc/self/cgroup")))?;
        Cgroups::new(Path::new(CGROUP_ROOT), &own, parent)
    }

    /// The cgroup of VM `name` (paths only; nothing is created).
    pub fn vm(&self, name: &str) -> VmCgroup {
        VmCgroup {
            version: self.version,
            dirs: self.parents.iter().map(|p| p.join(name)).collect(),
            parents: self.parents.clone(),
        }
    }

    /// Creates the cgroup of VM `name` with the limits of `res`. An
    /// existing cgroup of that name (left by a crash) is reused.
    pub fn create(&self, name: &str, res: &Resources) -> Result<VmCgroup, CgroupError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(CgroupError::BadParent(name.to_string()));
        }
        if self.version == CgroupVersion::V2 {
            self.enable_v2_controllers()?;
        }
        let cg = self.vm(name);
        for d in &cg.dirs {
            std::fs::create_dir_all(d).map_err(io_at(d))?;
        }
        for (path, value) in cg.limit_writes(res) {
            if let Err(e) = std::fs::write(&path, &value) {
                let _ = cg.remove(Duration::ZERO);
                return Err(io_at(&path)(e));
            }
        }
        Ok(cg)
    }

    /// v2: controllers must be enabled in every ancestor's
    /// `cgroup.subtree_control` down to the VMs' parent.
    fn enable_v2_controllers(&self) -> Result<(), CgroupError> {
        let Some(parent) = self.parents.first() else {
            return Ok(());
        };
        let rel = parent.strip_prefix(&self.root).unwrap_or(parent);
        let mut dir = self.root.clone();
        let mut chain = vec![dir.clone()];
        for c in rel.components() {
            dir.push(c);
            chain.push(dir.clone());
        }
        for d in chain {
            std::fs::create_dir_all(&d).map_err(io_at(&d))?;
            let available = std::fs::read_to_string(d.join("cgroup.controllers"))
                .map_err(io_at(&d.join("cgroup.controllers")))?;
            let enabled =
                std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap_or_default();
            for c in V2_CONTROLLERS {
                let has = |s: &str| s.split_whitespace().any(|x| x == c);
                if has(&available) && !has(&enabled) {
                    let f = d.join("cgroup.subtree_control");
                    std::fs::write(&f, format!("+{c}")).map_err(io_at(&f))?;
                }
            }
        }
        Ok(())
    }
}

/// One VM's cgroup: a directory per hierarchy (one on v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCgroup {
    pub version: CgroupVersion,
    /// The VM's cgroup directories (v1: in [`V1_CONTROLLERS`] order).
    pub dirs: Vec<PathBuf>,
    /// Their parents (removed too when they become empty).
    pub parents: Vec<PathBuf>,
}

impl VmCgroup {
    fn dir_of(&self, controller: &str) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dirs.first().map(PathBuf::as_path),
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .position(|c| *c == controller)
                .and_then(|i| self.dirs.get(i))
                .map(PathBuf::as_path),
        }
    }

    /// The files to write and their content for the limits of `res`.
    pub fn limit_writes(&self, res: &Resources) -> Vec<(PathBuf, String)> {
        let mut w = Vec::new();
        let (Some(cpu), Some(mem)) = (self.dir_of("cpu"), self.dir_of("memory")) else {
            return w;
        };
        let quota = res
            .cpu_limit_millis
            .map(|m| m.saturating_mul(CPU_PERIOD_US) / 1000);
        match self.version {
            CgroupVersion::V2 => {
                if let Some(q) = quota {
                    w.push((cpu.join("cpu.max"), format!("{q} {CPU_PERIOD_US}")));
                }
                if let Some(m) = res.memory_limit_bytes {
                    w.push((mem.join("memory.max"), m.to_string()));
                    // No swapping around the limit.
                    w.push((mem.join("memory.swap.max"), "0".to_string()));
                }
            }
            CgroupVersion::V1 => {
                if let Some(q) = quota {
                    w.push((cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string()));
                    w.push((cpu.join("cpu.cfs_quota_us"), q.to_string()));
                }
                if let Some(m) = res.memory_limit_bytes {
                    w.push((mem.join("memory.limit_in_bytes"), m.to_string()));
                }
            }
        }
        w
    }

    /// `cgroup.procs` of every directory: a process joins by writing its
    /// pid to each.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        v.dedup();
        v
    }

    /// Process ids in the cgroup (from the memory hierarchy on v1).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let Some(d) = self.dir_of("memory") else {
            return Ok(Vec::new());
        };
        let f = d.join("cgroup.procs");
        let text = std::fs::read_to_string(&f).map_err(io_at(&f))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The memory limit in force, `None` when unlimited.
    pub fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let (file, unlimited_above) = match self.version {
            CgroupVersion::V2 => ("memory.max", u64::MAX),
            // v1 reports "unlimited" as a huge page-aligned number.
            CgroupVersion::V1 => ("memory.limit_in_bytes", 1 << 62),
        };
        let f = self.file("memory", file)?;
        let text = read_trim(&f)?;
        if text == "max" {
            return Ok(None);
        }
        let v: u64 = parse(&f, &text)?;
        Ok((v < unlimited_above).then_some(v))
    }

    /// `(quota_us, period_us)` of the CPU limit; quota `None` when unlimited.
    pub fn cpu_quota(&self) -> Result<(Option<u64>, u64), CgroupError> {
        match self.version {
            CgroupVersion::V2 => {
                let f = self.file("cpu", "cpu.max")?;
                let text = read_trim(&f)?;
                let mut it = text.split_whitespace();
                let (q, p) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
                let period = parse(&f, p)?;
                let quota = if q == "max" {
                    None
                } else {
                    Some(parse(&f, q)?)
                };
                Ok((quota, period))
            }
            CgroupVersion::V1 => {
                let qf = self.file("cpu", "cpu.cfs_quota_us")?;
                let pf = self.file("cpu", "cpu.cfs_period_us")?;
                let q: i64 = parse(&qf, &read_trim(&qf)?)?;
                let p: u64 = parse(&pf, &read_trim(&pf)?)?;
                Ok((u64::try_from(q).ok(), p))
            }
        }
    }

    /// Memory charged to the cgroup now, in bytes.
    pub fn memory_usage_bytes(&self) -> Result<u64, CgroupError> {
        let name = match self.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        let f = self.file("memory", name)?;
        parse(&f, &read_trim(&f)?)
    }

    /// CPU time used by the cgroup so far, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        match self.version {
            CgroupVersion::V2 => {
                let f = self.file("cpu", "cpu.stat")?;
                let text = std::fs::read_to_string(&f).map_err(io_at(&f))?;
                let usec = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .ok_or_else(|| CgroupError::Parse {
                        path: f.clone(),
                        content: text.clone(),
                    })?;
                let us: u64 = parse(&f, usec.trim())?;
                Ok(us.saturating_mul(1000))
            }
            CgroupVersion::V1 => {
                let f = self.file("cpuacct", "cpuacct.usage")?;
                parse(&f, &read_trim(&f)?)
            }
        }
    }

    fn file(&self, controller: &str, name: &str) -> Result<PathBuf, CgroupError> {
        self.dir_of(controller)
            .map(|d| d.join(name))
            .ok_or_else(|| CgroupError::NotMounted {
                root: self.dirs.first().cloned().unwrap_or_default(),
                reason: format!("no {controller} hierarchy"),
            })
    }

    /// Removes the cgroup directories (they must hold no process; waits up
    /// to `wait` for the last one to leave), then the parents if they are
    /// empty. Missing directories are fine.
    pub fn remove(&self, wait: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + wait;
        for d in &self.dirs {
            loop {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_at(d)(e)),
                }
            }
        }
        for p in &self.parents {
            // Other VMs may still use it: best effort.
            let _ = std::fs::remove_dir(p);
        }
        Ok(())
    }

    /// Whether any of the directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}

fn read_trim(f: &Path) -> Result<String, CgroupError> {
    Ok(std::fs::read_to_string(f)
        .map_err(io_at(f))?
        .trim()
        .to_string())
}

fn parse<T: std::str::FromStr>(f: &Path, s: &str) -> Result<T, CgroupError> {
    s.parse().map_err(|_| CgroupError::Parse {
        path: f.to_path_buf(),
        content: s.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_SELF: &str =
        "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    fn fake_v1() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for c in ["cpu", "cpuacct", "memory", "pids"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            std::fs::write(d.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        // The hybrid layout's empty v2 tree does not make it v2.
        std::fs::create_dir_all(d.path().join("unified")).unwrap();
        std::fs::write(d.path().join("unified/cgroup.controllers"), "").unwrap();
        d
    }

    fn fake_v2() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
        d
    }

    #[test]
    fn detects_versions() {
        assert_eq!(detect(fake_v1().path()).unwrap(), CgroupVersion::V1);
        assert_eq!(detect(fake_v2().path()).unwrap(), CgroupVersion::V2);
        let empty = tempfile::tempdir().unwrap();
        let e = detect(empty.path()).unwrap_err().to_string();
        assert!(e.contains("cpu, cpuacct, memory"), "{e}");
    }

    #[test]
    fn own_cgroup_lines() {
        assert_eq!(
            own_cgroup(V1_SELF, CgroupVersion::V1, "memory").as_deref(),
            Some("/process_api/abc")
        );
        assert_eq!(
            own_cgroup(V1_SELF, CgroupVersion::V1, "cpu").as_deref(),
            Some("/")
        );
        assert_eq!(
            own_cgroup(V1_SELF, CgroupVersion::V2, "").as_deref(),
            Some("/")
        );
        let joined = "5:cpu,cpuacct:/a/b\n0::/user.slice/s.scope\n";
        assert_eq!(
            own_cgroup(joined, CgroupVersion::V1, "cpuacct").as_deref(),
            Some("/a/b")
        );
        assert_eq!(
            own_cgroup(joined, CgroupVersion::V2, "").as_deref(),
            Some("/user.slice/s.scope")
        );
        assert_eq!(own_cgroup(joined, CgroupVersion::V1, "memory"), None);
    }

    #[test]
    fn v1_layout_and_limits() {
        let root = fake_v1();
        let r = root.path();
        let cg = Cgroups::new(r, V1_SELF, None).unwrap();
        assert_eq!(cg.version, CgroupVersion::V1);
        assert_eq!(
            cg.parents,
            vec![
                r.join("cpu/krvirt"),
                r.join("cpuacct/krvirt"),
                r.join("memory/process_api/abc/krvirt"),
            ]
        );
        let vm = cg.vm("vmi-1");
        let res = Resources {
            memory_limit_bytes: Some(512 << 20),
            cpu_limit_millis: Some(1500),
            dedicated_cpus: vec![],
        };
        assert_eq!(
            vm.limit_writes(&res),
            vec![
                (
                    r.join("cpu/krvirt/vmi-1/cpu.cfs_period_us"),
                    "100000".to_string()
                ),
                (
                    r.join("cpu/krvirt/vmi-1/cpu.cfs_quota_us"),
                    "150000".to_string()
                ),
                (
                    r.join("memory/process_api/abc/krvirt/vmi-1/memory.limit_in_bytes"),
                    "536870912".to_string()
                ),
            ]
        );
        assert!(vm.limit_writes(&Resources::default()).is_empty());
        assert_eq!(vm.procs_files().len(), 3);

        // Against the fake root the files are plain files: create, read
        // back, remove (parents too once empty).
        let made = cg.create("vmi-1", &res).unwrap();
        assert_eq!(made, vm);
        assert_eq!(made.memory_limit().unwrap(), Some(512 << 20));
        assert_eq!(made.cpu_quota().unwrap(), (Some(150_000), 100_000));
        for d in &made.dirs {
            for f in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        made.remove(Duration::ZERO).unwrap();
        assert!(!made.exists());
        assert!(!r.join("cpu/krvirt").exists());
    }

    #[test]
    fn v2_layout_limits_and_controllers() {
        let root = fake_v2();
        let r = root.path();
        let own = "0::/user.slice/session-1.scope\n";
        let cg = Cgroups::new(r, own, None).unwrap();
        assert_eq!(cg.parents, vec![r.join("user.slice/krvirt")]);
        let at_root = Cgroups::new(r, "0::/\n", None).unwrap();
        assert_eq!(at_root.parents, vec![r.join("krvirt")]);
        let explicit = Cgroups::new(r, own, Some("/machine.slice/krvirt")).unwrap();
        assert_eq!(explicit.parents, vec![r.join("machine.slice/krvirt")]);
        assert!(matches!(
            Cgroups::new(r, own, Some("../escape")),
            Err(CgroupError::BadParent(_))
        ));

        let vm = at_root.vm("vmi-2");
        let res = Resources {
            memory_limit_bytes: Some(1 << 30),
            cpu_limit_millis: Some(250),
            dedicated_cpus: vec![],
        };
        assert_eq!(
            vm.limit_writes(&res),
            vec![
                (r.join("krvirt/vmi-2/cpu.max"), "25000 100000".to_string()),
                (r.join("krvirt/vmi-2/memory.max"), "1073741824".to_string()),
                (r.join("krvirt/vmi-2/memory.swap.max"), "0".to_string()),
            ]
        );
        // Controllers are handed down from the root (the fake kernel does
        // not create the interface files of a new cgroup: seed them).
        std::fs::create_dir_all(r.join("krvirt")).unwrap();
        std::fs::write(r.join("krvirt/cgroup.controllers"), "cpu memory pids\n").unwrap();
        at_root.enable_v2_controllers().unwrap();
        // Each "+c" write replaces the fake file: the last one stays.
        assert_eq!(
            std::fs::read_to_string(r.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        let made = at_root.create("vmi-2", &res).unwrap();
        assert_eq!(made.memory_limit().unwrap(), Some(1 << 30));
        assert_eq!(made.cpu_quota().unwrap(), (Some(25_000), 100_000));
        std::fs::write(r.join("krvirt/vmi-2/memory.max"), "max\n").unwrap();
        assert_eq!(made.memory_limit().unwrap(), None);
        std::fs::write(
            r.join("krvirt/vmi-2/cpu.stat"),
            "usage_usec 1234\nuser_usec 1\n",
        )
        .unwrap();
        assert_eq!(made.cpu_usage_ns().unwrap(), 1_234_000);
    }

    #[test]
    fn bad_names_are_refused() {
        let root = fake_v1();
        let cg = Cgroups::new(root.path(), V1_SELF, None).unwrap();
        for bad in ["", "a/b", "..", "."] {
            assert!(cg.create(bad, &Resources::default()).is_err(), "{bad:?}");
        }
        let no_mem = "1:cpu:/\n2:cpuacct:/\n";
        assert!(matches!(
            Cgroups::new(root.path(), no_mem, None),
            Err(CgroupError::OwnCgroupUnknown { .. })
        ));
    }
}
