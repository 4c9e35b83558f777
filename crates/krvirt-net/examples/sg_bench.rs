//! Benchmark behind `bench/net`: apply a security-group change with 1,000
//! rules across 50 interfaces (compile + one `nft -f -` transaction)
//! against `nft -f` of the same ruleset in nft's text form. Uses its own
//! tables (`kvbench<pid>`), removed at the end; no interface is needed
//! (rules name taps and addresses, nothing is sent).
//!
//! krvirt_s is the incremental change the agent makes when a group's rules
//! change (one transaction flushing and refilling the group's chain);
//! full_replace_s replaces both tables, as after a restart.
//!
//! Last line: `{"krvirt_s": median, "nft_s": median, "ratio": ..., "full_replace_s": ..., "full_ratio": ..., "runs": N, "rules": 1000, "interfaces": 50}`

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Instant;

use krvirt_net::firewall::{self, Group, Port, Proto, Rule, Ruleset};

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = firewall::remove(&self.0);
    }
}

fn ruleset(variant: u16) -> Ruleset {
    let rules = (0..1000u16)
        .map(|i| Rule {
            proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp },
            ports: Some((1000 + i + variant, 1000 + i + variant)),
            cidrs: vec![
                format!("10.{}.{}.0/24", i / 250, i % 250)
                    .parse()
                    .expect("cidr"),
            ],
            remote_group: None,
        })
        .collect();
    Ruleset {
        remote: Vec::new(),
        groups: vec![Group {
            name: "bench/sg".into(),
            ingress: rules,
            egress: vec![],
        }],
        ports: (0..50u8)
            .map(|i| Port {
                tap: format!("kvbench{i}"),
                mac: format!("02:00:00:00:01:{i:02x}"),
                ip: Some(Ipv4Addr::new(10, 251, 0, i + 2)),
                groups: vec!["bench/sg".into()],
            })
            .collect(),
        zones: vec![],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("KVBENCH_DUMP").is_some() {
        dump();
        return Ok(());
    }
    let runs = 9;
    let table = format!("kvbench{}", std::process::id());
    let _c = Cleanup(table.clone());
    let mut fw = firewall::Firewall::new(&table)?;
    fw.apply(&ruleset(0))?;
    // The same ruleset as nft prints it, replaced the same way (atomic).
    let mut text = String::new();
    for family in ["bridge", "inet"] {
        let o = Command::new("nft")
            .args(["list", "table", family, &table])
            .output()?;
        if !o.status.success() {
            return Err(format!("nft list: {}", String::from_utf8_lossy(&o.stderr)).into());
        }
        text.push_str(&format!(
            "table {family} {table}\ndelete table {family} {table}\n"
        ));
        text.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    let dir = std::env::temp_dir().join(format!("kvbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("ruleset.nft");
    std::fs::write(&file, &text)?;
    // Interleaved, one of each per round (this machine is noisy).
    let (mut krvirt, mut full, mut nft) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        // Incremental: what the agent does when a security group changes
        // (the firewall still holds the previous round's ruleset).
        let rs = ruleset(1 + r as u16);
        let t = Instant::now();
        fw.apply(&rs)?;
        krvirt.push(t.elapsed().as_secs_f64());
        // `nft -f` of the whole ruleset in text form.
        let t = Instant::now();
        let o = Command::new("nft").arg("-f").arg(&file).output()?;
        nft.push(t.elapsed().as_secs_f64());
        if !o.status.success() {
            return Err(format!("nft -f: {}", String::from_utf8_lossy(&o.stderr)).into());
        }
        // Full replacement of both tables (after a restart, or a port change).
        let rs = ruleset(100 + r as u16);
        let t = Instant::now();
        firewall::sync(&rs, &table)?;
        full.push(t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (k, n, f) = (median(krvirt), median(nft), median(full));
    println!(
        "{{\"krvirt_s\": {k:.4}, \"nft_s\": {n:.4}, \"ratio\": {:.3}, \"full_replace_s\": {f:.4}, \"full_ratio\": {:.3}, \"runs\": {runs}, \"rules\": 1000, \"interfaces\": 50}}",
        k / n,
        f / n
    );
    Ok(())
}

#[allow(dead_code)]
fn dump() {
    let doc = firewall::compile(&ruleset(3), "kvbenchx").expect("compile");
    std::fs::write("/tmp/kvbench.nft", doc.to_string()).expect("write");
}
