//! cloud-init NoCloud seed images: a small vfat filesystem labelled
//! `cidata` holding `meta-data`, `user-data` and optionally
//! `network-config` (the file names cloud-init's NoCloud datasource reads).

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fat;

/// Volume label of a NoCloud seed (cloud-init matches it case-insensitively).
pub const NOCLOUD_LABEL: &str = "cidata";

/// What goes into a NoCloud seed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// `instance-id` in meta-data (cloud-init re-runs per-instance modules when it changes).
    pub instance_id: String,
    /// `local-hostname` in meta-data.
    pub local_hostname: String,
    /// Content of `user-data` (`#!...` script or `#cloud-config`); an empty
    /// `user-data` file is written when `None`, as NoCloud requires the file.
    pub user_data: Option<Vec<u8>>,
    /// Content of `network-config`; the file is omitted when `None`.
    pub network_config: Option<Vec<u8>>,
}

impl NoCloudSeed {
    /// The `meta-data` document (YAML) this seed writes.
    pub fn meta_data(&self) -> Result<String> {
        validate_scalar("instance_id", &self.instance_id)?;
        validate_scalar("local_hostname", &self.local_hostname)?;
        Ok(format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_scalar(&self.instance_id),
            yaml_scalar(&self.local_hostname)
        ))
    }

    /// A volume id derived from the content (stable for identical seeds,
    /// different for different ones; never zero).
    pub fn volume_id(&self) -> u32 {
        let mut h = Sha256::new();
        h.update(self.instance_id.as_bytes());
        h.update([0]);
        h.update(self.local_hostname.as_bytes());
        h.update([0]);
        for part in [&self.user_data, &self.network_config] {
            match part {
                Some(d) => {
                    h.update([1]);
                    h.update((d.len() as u64).to_le_bytes());
                    h.update(d);
                }
                None => h.update([0]),
            }
        }
        let d = h.finalize();
        let id = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        if id == 0 { 0x6b72_7669 } else { id }
    }
}

fn validate_scalar(field: &'static str, v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::Invalid {
            field,
            reason: "must not be empty".into(),
        });
    }
    if v.len() > 253 {
        return Err(Error::Invalid {
            field,
            reason: format!("{} bytes, at most 253 allowed", v.len()),
        });
    }
    if v.chars().any(char::is_control) {
        return Err(Error::Invalid {
            field,
            reason: format!("{v:?} contains control characters"),
        });
    }
    Ok(())
}

/// Plain YAML scalar when it is unambiguous, else a JSON (= YAML
/// double-quoted) string.
fn yaml_scalar(v: &str) -> String {
    let plain = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && !matches!(
            v.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null"
        )
        && v.parse::<f64>().is_err();
    if plain {
        v.to_string()
    } else {
        serde_json::Value::String(v.to_string()).to_string()
    }
}

/// Write a NoCloud seed image (a bare vfat filesystem, no partition table)
/// to `path`, replacing any existing file. The volume label `cidata` is
/// stored in the boot sector and as the root directory's volume-label entry.
pub fn write_nocloud_seed(path: &Path, seed: &NoCloudSeed) -> Result<()> {
    let meta = seed.meta_data()?;
    let user = seed.user_data.as_deref().unwrap_or(b"");
    let payload = meta.len() + user.len() + seed.network_config.as_ref().map_or(0, Vec::len);
    // Room for FAT overhead and cluster slack; at least 2 MiB, in MiB steps.
    let mib: u64 = 1 << 20;
    let size = ((payload as u64 * 5 / 4 + mib).div_ceil(mib) * mib).max(2 * mib);
    if size > 1 << 30 {
        return Err(Error::TooLarge {
            what: "NoCloud seed",
            reason: format!("{payload} bytes of user-data/network-config"),
        });
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        file.set_len(size)
            .ctx(|| format!("sizing {}", tmp.display()))?;
        fat::format(&mut file, 0, size, NOCLOUD_LABEL, seed.volume_id(), 0)?;
        let fs = fat::open_reproducible(&mut file, 0, size)?;
        fat::write_file(&fs, "meta-data", meta.as_bytes())?;
        fat::write_file(&fs, "user-data", user)?;
        if let Some(net) = &seed.network_config {
            fat::write_file(&fs, "network-config", net)?;
        }
        fs.unmount().ctx(|| "closing seed filesystem".into())?;
        file.sync_all()
            .ctx(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(|| format!("renaming seed to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::Command;

    fn seed() -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "vmi-nocloud.default".into(),
            local_hostname: "vmi-nocloud".into(),
            user_data: Some(b"#!/bin/sh\necho 'printed from cloud-init userdata'\n".to_vec()),
            network_config: Some(b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".to_vec()),
        }
    }

    fn mtools(args: &[&str]) -> String {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (install mtools): {e}", args[0]));
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn meta_data_quotes_only_when_needed() {
        let mut s = seed();
        assert_eq!(
            s.meta_data().unwrap(),
            "instance-id: vmi-nocloud.default\nlocal-hostname: vmi-nocloud\n"
        );
        s.instance_id = "id: with colon".into();
        s.local_hostname = "yes".into();
        assert_eq!(
            s.meta_data().unwrap(),
            "instance-id: \"id: with colon\"\nlocal-hostname: \"yes\"\n"
        );
        s.local_hostname = "bad\nname".into();
        assert!(matches!(s.meta_data(), Err(Error::Invalid { .. })));
        s.local_hostname = String::new();
        assert!(s.meta_data().is_err());
    }

    #[test]
    fn seed_reads_back_with_mtools() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("cidata.img");
        let s = seed();
        write_nocloud_seed(&img, &s).unwrap();
        let img_s = img.to_str().unwrap();
        assert_eq!(
            mtools(&["mtype", "-i", img_s, "::meta-data"]),
            s.meta_data().unwrap()
        );
        assert_eq!(
            mtools(&["mtype", "-i", img_s, "::user-data"]).as_bytes(),
            s.user_data.as_deref().unwrap()
        );
        assert_eq!(
            mtools(&["mtype", "-i", img_s, "::network-config"]).as_bytes(),
            s.network_config.as_deref().unwrap()
        );
        // Label from the root directory entry (what mtools shows) and the id.
        let listing = mtools(&["mdir", "-i", img_s, "::"]);
        assert!(listing.contains("Volume in drive : is cidata"), "{listing}");
        let id = s.volume_id();
        let want = format!("{:04X}-{:04X}", id >> 16, id & 0xffff);
        assert!(listing.contains(&want), "want serial {want} in {listing}");
    }

    #[test]
    fn seed_label_in_boot_sector_and_root_dir() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("cidata.img");
        let mut s = seed();
        s.user_data = None;
        s.network_config = None;
        write_nocloud_seed(&img, &s).unwrap();
        let raw = std::fs::read(&img).unwrap();
        // FAT12/16 extended BPB: volume id at 0x27, label at 0x2b.
        assert_eq!(&raw[0x2b..0x36], b"cidata     ");
        assert_eq!(
            u32::from_le_bytes(raw[0x27..0x2b].try_into().unwrap()),
            s.volume_id()
        );
        assert_ne!(s.volume_id(), 0x1234_5678);
        let len = std::fs::metadata(&img).unwrap().len();
        let mut rw = File::options().read(true).write(true).open(&img).unwrap();
        let fs = fat::open(&mut rw, 0, len).unwrap();
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("cidata")
        );
        let mut ud = Vec::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_end(&mut ud)
            .unwrap();
        assert!(ud.is_empty());
        assert!(fs.root_dir().open_file("network-config").is_err());
    }

    #[test]
    fn different_seeds_get_different_volume_ids() {
        let a = seed();
        let mut b = seed();
        b.instance_id.push('x');
        assert_ne!(a.volume_id(), b.volume_id());
        assert_eq!(a.volume_id(), seed().volume_id());
    }

    #[test]
    fn the_same_seed_is_the_same_bytes() {
        // A live-migration target writes the seed again from the VMI
        // instead of copying it: the guest must see the very same disk.
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        write_nocloud_seed(&a, &seed()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_nocloud_seed(&b, &seed()).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }
}
