//! A writer for the cpio "newc" format (the format the Linux kernel unpacks
//! as an initramfs), with optional gzip compression via flate2.
//!
//! Entries are emitted in the order they are added; parents are created
//! automatically (as directories, mode 0755) the first time a path below
//! them is added, so the archive always lists a directory before its
//! contents, which the kernel's unpacker requires.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streaming newc archive writer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    mtime: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive. Every entry gets `mtime` (seconds since the epoch),
    /// which keeps archives reproducible.
    pub fn new(out: W, mtime: u32) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            mtime,
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// Add a directory (and its missing parents).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = normalize(path)?;
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])
    }

    /// Add a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    /// Add a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Add a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Whether a path has already been added.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.names.contains(&p) || self.dirs.contains(&p))
    }

    /// Write the trailer and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw_entry("TRAILER!!!", 0, 0, 1, (0, 0), &[])?;
        // Pad the archive to a 512-byte multiple like cpio(1) does.
        let pad = (512 - (self.written % 512)) % 512;
        self.write_all(&vec![0u8; pad as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for comp in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(comp);
            if !self.dirs.contains(&acc) {
                self.dirs.insert(acc.clone());
                let a = acc.clone();
                self.entry(&a, S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if !self.names.insert(path.to_string()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("duplicate cpio entry {path}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(path, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
             {dmaj:08X}{dmin:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = self.mtime,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.write_all(header.as_bytes())?;
        self.write_all(name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad4()?;
        self.write_all(data)?;
        self.pad4()
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.write_all(&[0u8; 3][..pad as usize])
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }
}

/// Strip leading `/` and `./`, reject empty components and `..`.
fn normalize(path: &str) -> io::Result<String> {
    let mut parts = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cpio path {path} contains .."),
                ));
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_padding() {
        let mut w = CpioWriter::new(Vec::new(), 0x1234);
        w.file("/a/b", 0o644, b"xyz").unwrap();
        let out = w.finish().unwrap();
        // First entry is the auto-created directory "a".
        assert_eq!(&out[..6], b"070701");
        let mode = u32::from_str_radix(std::str::from_utf8(&out[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, S_IFDIR | 0o755);
        let mtime = u32::from_str_radix(std::str::from_utf8(&out[46..54]).unwrap(), 16).unwrap();
        assert_eq!(mtime, 0x1234);
        // 110-byte header + "a\0" padded to 112.
        assert_eq!(&out[112..118], b"070701");
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn rejects_dotdot_and_duplicates() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        assert!(w.file("../etc/x", 0o644, b"").is_err());
        w.file("x", 0o644, b"").unwrap();
        assert!(w.file("/x", 0o644, b"").is_err());
        assert!(w.contains("./x"));
    }

    /// Round trip through busybox cpio (a real, independent unpacker).
    #[test]
    fn busybox_cpio_extracts_archive() {
        let busybox = std::path::Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox missing: install busybox-static"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hello", 0o600, b"hello world\n").unwrap();
        w.file("bin/odd", 0o755, b"12345").unwrap();
        w.symlink("bin/link", "odd").unwrap();
        let archive = w.finish().unwrap();
        let mut child = std::process::Command::new(busybox)
            .args(["cpio", "-i", "-d"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        let p = dir.path();
        assert_eq!(
            std::fs::read_to_string(p.join("etc/hello")).unwrap(),
            "hello world\n"
        );
        assert_eq!(std::fs::read(p.join("bin/odd")).unwrap(), b"12345");
        assert_eq!(
            std::fs::read_link(p.join("bin/link")).unwrap(),
            std::path::PathBuf::from("odd")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p.join("bin/odd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
