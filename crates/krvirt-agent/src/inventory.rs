//! Host inventory: CPUs, NUMA nodes, memory and hugepages, read from
//! `/sys` and `/proc` below a root directory (`/` in production; tests point
//! it at a tree they build).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One logical CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    pub id: u32,
    pub core: u32,
    pub socket: u32,
    pub numa_node: u32,
}

/// One NUMA node with its CPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// Hugepages of one size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugepagePool {
    pub page_size_bytes: u64,
    pub total: u64,
    pub free: u64,
}

/// What the agent reports about its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub cpus: Vec<CpuInfo>,
    pub numa_nodes: Vec<NumaNode>,
    pub memory_bytes: u64,
    pub hugepages: Vec<HugepagePool>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {what}")]
    Parse { path: PathBuf, what: String },
}

fn read(path: &Path) -> Result<String, InventoryError> {
    fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u32(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Parse a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.parse().map_err(|_| format!("bad cpu range {part:?}"))?;
                let b: u32 = b.parse().map_err(|_| format!("bad cpu range {part:?}"))?;
                if b < a {
                    return Err(format!("bad cpu range {part:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| format!("bad cpu {part:?}"))?),
        }
    }
    Ok(out)
}

/// Read `MemTotal` (bytes) from a meminfo-format file.
fn meminfo_total(path: &Path) -> Result<u64, InventoryError> {
    let text = read(path)?;
    for line in text.lines() {
        // Node meminfo lines look like "Node 0 MemTotal:  123 kB".
        if let Some(rest) = line.split("MemTotal:").nth(1) {
            let kb = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .map_err(|e| InventoryError::Parse {
                    path: path.to_path_buf(),
                    what: e.to_string(),
                })?;
            return Ok(kb * 1024);
        }
    }
    Err(InventoryError::Parse {
        path: path.to_path_buf(),
        what: "no MemTotal line".into(),
    })
}

/// Read the inventory below `root`.
pub fn read_inventory(root: &Path) -> Result<Inventory, InventoryError> {
    let sys_cpu = root.join("sys/devices/system/cpu");
    let online_path = sys_cpu.join("online");
    let online = parse_cpu_list(&read(&online_path)?).map_err(|what| InventoryError::Parse {
        path: online_path.clone(),
        what,
    })?;

    // NUMA nodes; a kernel without NUMA support has no node directory: one node 0.
    let mut numa_nodes = Vec::new();
    let mut cpu_node: BTreeMap<u32, u32> = BTreeMap::new();
    let node_dir = root.join("sys/devices/system/node");
    if let Ok(entries) = fs::read_dir(&node_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(id) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpulist_path = entry.path().join("cpulist");
            let cpus =
                parse_cpu_list(&read(&cpulist_path)?).map_err(|what| InventoryError::Parse {
                    path: cpulist_path.clone(),
                    what,
                })?;
            for c in &cpus {
                cpu_node.insert(*c, id);
            }
            let memory_bytes = meminfo_total(&entry.path().join("meminfo")).unwrap_or(0);
            numa_nodes.push(NumaNode {
                id,
                cpus,
                memory_bytes,
            });
        }
    }
    numa_nodes.sort_by_key(|n| n.id);

    let memory_bytes = meminfo_total(&root.join("proc/meminfo"))?;
    if numa_nodes.is_empty() {
        numa_nodes.push(NumaNode {
            id: 0,
            cpus: online.clone(),
            memory_bytes,
        });
    }

    let cpus = online
        .iter()
        .map(|&id| {
            let topo = sys_cpu.join(format!("cpu{id}/topology"));
            CpuInfo {
                id,
                core: read_u32(&topo.join("core_id")).unwrap_or(id),
                socket: read_u32(&topo.join("physical_package_id")).unwrap_or(0),
                numa_node: cpu_node.get(&id).copied().unwrap_or(0),
            }
        })
        .collect();

    let mut hugepages = Vec::new();
    if let Ok(entries) = fs::read_dir(root.join("sys/kernel/mm/hugepages")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(kb) = name
                .strip_prefix("hugepages-")
                .and_then(|s| s.strip_suffix("kB"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let total = read_u32(&entry.path().join("nr_hugepages")).unwrap_or(0) as u64;
            let free = read_u32(&entry.path().join("free_hugepages")).unwrap_or(0) as u64;
            hugepages.push(HugepagePool {
                page_size_bytes: kb * 1024,
                total,
                free,
            });
        }
    }
    hugepages.sort_by_key(|h| h.page_size_bytes);

    Ok(Inventory {
        cpus,
        numa_nodes,
        memory_bytes,
        hugepages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn two_numa_nodes_with_hugepages() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "sys/devices/system/cpu/online", "0-3\n");
        for (cpu, core, pkg) in [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)] {
            write(
                r,
                &format!("sys/devices/system/cpu/cpu{cpu}/topology/core_id"),
                &format!("{core}\n"),
            );
            write(
                r,
                &format!("sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"),
                &format!("{pkg}\n"),
            );
        }
        write(r, "sys/devices/system/node/node0/cpulist", "0-1\n");
        write(
            r,
            "sys/devices/system/node/node0/meminfo",
            "Node 0 MemTotal:  1024 kB\n",
        );
        write(r, "sys/devices/system/node/node1/cpulist", "2-3\n");
        write(
            r,
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemTotal:  2048 kB\n",
        );
        write(
            r,
            "proc/meminfo",
            "MemTotal:        3072 kB\nMemFree: 1 kB\n",
        );
        write(
            r,
            "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "16\n",
        );
        write(
            r,
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "10\n",
        );
        let inv = read_inventory(r).unwrap();
        assert_eq!(inv.memory_bytes, 3072 * 1024);
        assert_eq!(inv.numa_nodes.len(), 2);
        assert_eq!(inv.numa_nodes[1].cpus, vec![2, 3]);
        assert_eq!(inv.numa_nodes[1].memory_bytes, 2048 * 1024);
        assert_eq!(
            inv.cpus[2],
            CpuInfo {
                id: 2,
                core: 0,
                socket: 1,
                numa_node: 1
            }
        );
        assert_eq!(
            inv.hugepages,
            vec![HugepagePool {
                page_size_bytes: 2 * 1024 * 1024,
                total: 16,
                free: 10
            }]
        );
    }

    #[test]
    fn no_numa_directory_means_one_node() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "sys/devices/system/cpu/online", "0-1\n");
        write(r, "proc/meminfo", "MemTotal: 4096 kB\n");
        let inv = read_inventory(r).unwrap();
        assert_eq!(inv.numa_nodes.len(), 1);
        assert_eq!(inv.numa_nodes[0].cpus, vec![0, 1]);
        assert_eq!(inv.numa_nodes[0].memory_bytes, 4096 * 1024);
    }

    #[test]
    fn this_machine() {
        let inv = read_inventory(Path::new("/")).unwrap();
        assert!(!inv.cpus.is_empty());
        assert!(inv.memory_bytes > 0);
    }

    #[test]
    fn missing_meminfo_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "sys/devices/system/cpu/online", "0\n");
        let err = read_inventory(t.path()).unwrap_err().to_string();
        assert!(err.contains("proc/meminfo"), "{err}");
    }
}
