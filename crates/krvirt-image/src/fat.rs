//! FAT and MBR helpers on top of the `fatfs` crate: format a FAT volume at
//! an offset inside an image file with a real label and volume id, write
//! files into it, and write a classic MBR partition table.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::error::{Error, IoContext, Result};

/// A window `[offset, offset+len)` of an underlying seekable stream.
pub(crate) struct Slice<T> {
    inner: T,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<T: Seek> Slice<T> {
    pub(crate) fn new(mut inner: T, offset: u64, len: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(offset))?;
        Ok(Slice {
            inner,
            offset,
            len,
            pos: 0,
        })
    }

    fn remaining(&self, want: usize) -> usize {
        let left = self.len.saturating_sub(self.pos);
        want.min(usize::try_from(left).unwrap_or(usize::MAX))
    }
}

impl<T: Read + Seek> Read for Slice<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.remaining(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<T: Write + Seek> Write for Slice<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.remaining(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the FAT volume",
            ));
        }
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Seek> Seek for Slice<T> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad seek"))?;
        self.inner.seek(SeekFrom::Start(self.offset + new))?;
        self.pos = new;
        Ok(new)
    }
}

/// Pad/validate a FAT volume label into the 11-byte on-disk form.
pub(crate) fn label_bytes(label: &str) -> Result<[u8; 11]> {
    if label.is_empty() || label.len() > 11 {
        return Err(Error::Invalid {
            field: "volume label",
            reason: format!("{label:?} must be 1 to 11 bytes"),
        });
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b' ')
    {
        return Err(Error::Invalid {
            field: "volume label",
            reason: format!("{label:?} may only hold ASCII letters, digits, '-', '_' and ' '"),
        });
    }
    let mut out = [b' '; 11];
    out[..label.len()].copy_from_slice(label.as_bytes());
    Ok(out)
}

/// What kind of FAT `format_volume` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

impl Kind {
    /// MBR partition type byte (LBA variants).
    pub(crate) fn mbr_type(self) -> u8 {
        match self {
            Kind::Fat12 => 0x01,
            Kind::Fat16 => 0x0e,
            Kind::Fat32 => 0x0c,
        }
    }
}

/// Format `[offset, offset+size)` of `file` as FAT with the given label
/// (written both into the boot sector and as the root-directory volume
/// label entry) and volume id. `hidden_sectors` is stored in the BPB (the
/// partition's start LBA; 0 for a whole-device filesystem).
pub(crate) fn format(
    file: &mut File,
    offset: u64,
    size: u64,
    label: &str,
    volume_id: u32,
    hidden_sectors: u32,
) -> Result<Kind> {
    let label = label_bytes(label)?;
    let total_sectors = u32::try_from(size / 512).map_err(|_| Error::TooLarge {
        what: "FAT volume",
        reason: format!("{size} bytes"),
    })?;
    let opts = fatfs::FormatVolumeOptions::new()
        .volume_label(label)
        .volume_id(volume_id)
        .total_sectors(total_sectors);
    {
        let slice = Slice::new(&mut *file, offset, size).ctx(|| "seeking image".into())?;
        fatfs::format_volume(slice, opts).ctx(|| "formatting FAT volume".into())?;
    }
    // fatfs always writes hidden_sectors = 0; patch the BPB (and the FAT32
    // backup boot sector) so boot code that trusts it finds the partition.
    let mut bs = [0u8; 512];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut bs))
        .ctx(|| "reading back boot sector".into())?;
    let fat16_spf = u16::from_le_bytes([bs[0x16], bs[0x17]]);
    let mut sectors = vec![0u64];
    if fat16_spf == 0 {
        let backup = u16::from_le_bytes([bs[0x32], bs[0x33]]);
        if backup != 0 {
            sectors.push(u64::from(backup));
        }
    }
    for s in sectors {
        file.seek(SeekFrom::Start(offset + s * 512 + 0x1c))
            .and_then(|_| file.write_all(&hidden_sectors.to_le_bytes()))
            .ctx(|| "patching hidden sectors".into())?;
    }
    let fs = open(file, offset, size)?;
    let kind = match fs.fat_type() {
        fatfs::FatType::Fat12 => Kind::Fat12,
        fatfs::FatType::Fat16 => Kind::Fat16,
        fatfs::FatType::Fat32 => Kind::Fat32,
    };
    fs.unmount().ctx(|| "closing FAT volume".into())?;
    Ok(kind)
}

/// Open the FAT volume at `[offset, offset+size)`.
pub(crate) fn open(
    file: &mut File,
    offset: u64,
    size: u64,
) -> Result<fatfs::FileSystem<Slice<&mut File>>> {
    let slice = Slice::new(file, offset, size).ctx(|| "seeking image".into())?;
    fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).ctx(|| "opening FAT volume".into())
}

/// Timestamps of a FAT volume whose bytes must not depend on when it was
/// written: DOS's epoch, 1980-01-01 00:00:00.
#[derive(Debug)]
struct Epoch;

impl fatfs::TimeProvider for Epoch {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static EPOCH: Epoch = Epoch;

/// [`open`] with every timestamp at DOS's epoch: the same writes give the
/// same bytes (a NoCloud seed made again on a migration target).
pub(crate) fn open_reproducible(
    file: &mut File,
    offset: u64,
    size: u64,
) -> Result<fatfs::FileSystem<Slice<&mut File>>> {
    let slice = Slice::new(file, offset, size).ctx(|| "seeking image".into())?;
    fatfs::FileSystem::new(slice, fatfs::FsOptions::new().time_provider(&EPOCH))
        .ctx(|| "opening FAT volume".into())
}

/// Create a directory (its parent must exist); an existing one is fine.
pub(crate) fn create_dir<T: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<T>,
    path: &str,
) -> Result<()> {
    fs.root_dir()
        .create_dir(path)
        .map(|_| ())
        .ctx(|| format!("creating directory {path} in FAT volume"))
}

/// Write (create or truncate) a file at `path` (`/`-separated, parents must exist) in `fs`.
pub(crate) fn write_file<T: fatfs::ReadWriteSeek>(
    fs: &fatfs::FileSystem<T>,
    name: &str,
    data: &[u8],
) -> Result<()> {
    let mut f = fs
        .root_dir()
        .create_file(name)
        .ctx(|| format!("creating {name} in FAT volume"))?;
    f.truncate().ctx(|| format!("truncating {name}"))?;
    f.write_all(data)
        .and_then(|_| f.flush())
        .ctx(|| format!("writing {name} into FAT volume"))
}

fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SPT: u64 = 63;
    let c = lba / (HEADS * SPT);
    if c > 1023 {
        return [254, 0xff, 0xff];
    }
    let h = (lba / SPT) % HEADS;
    let s = lba % SPT + 1;
    [
        h as u8,
        (s as u8 & 0x3f) | (((c >> 2) as u8) & 0xc0),
        (c & 0xff) as u8,
    ]
}

/// Write an MBR with `boot_code` (at most 440 bytes), a disk signature and
/// one active partition.
pub(crate) fn write_mbr(
    file: &mut File,
    boot_code: &[u8],
    disk_signature: u32,
    start_lba: u32,
    sectors: u32,
    part_type: u8,
) -> Result<()> {
    if boot_code.len() > 440 {
        return Err(Error::Invalid {
            field: "MBR boot code",
            reason: format!("{} bytes, at most 440 fit", boot_code.len()),
        });
    }
    let mut mbr = [0u8; 512];
    mbr[..boot_code.len()].copy_from_slice(boot_code);
    mbr[440..444].copy_from_slice(&disk_signature.to_le_bytes());
    let e = &mut mbr[446..462];
    e[0] = 0x80;
    e[1..4].copy_from_slice(&chs(u64::from(start_lba)));
    e[4] = part_type;
    e[5..8].copy_from_slice(&chs(u64::from(start_lba) + u64::from(sectors) - 1));
    e[8..12].copy_from_slice(&start_lba.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&mbr))
        .ctx(|| "writing MBR".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_encoding() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(u64::from(u32::MAX)), [254, 0xff, 0xff]);
    }

    #[test]
    fn label_validation() {
        assert_eq!(&label_bytes("cidata").unwrap(), b"cidata     ");
        assert!(label_bytes("").is_err());
        assert!(label_bytes("waytoolonglabel").is_err());
        assert!(label_bytes("a/b").is_err());
    }

    #[test]
    fn format_at_offset_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let kind = format(&mut f, 1 << 20, 3 << 20, "TESTVOL", 0xdead_beef, 2048).unwrap();
        write_mbr(&mut f, &[0x90; 10], 1, 2048, 6144, kind.mbr_type()).unwrap();
        {
            let fs = open(&mut f, 1 << 20, 3 << 20).unwrap();
            write_file(&fs, "hello.txt", b"hi").unwrap();
            assert_eq!(fs.volume_id(), 0xdead_beef);
            assert_eq!(fs.volume_label(), "TESTVOL");
            fs.unmount().unwrap();
        }
        let fs = open(&mut f, 1 << 20, 3 << 20).unwrap();
        let mut s = String::new();
        fs.root_dir()
            .open_file("hello.txt")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hi");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("TESTVOL")
        );
        drop(fs);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[510..512], &[0x55, 0xaa]);
        assert_eq!(raw[446], 0x80);
        let hidden =
            u32::from_le_bytes(raw[(1 << 20) + 0x1c..(1 << 20) + 0x20].try_into().unwrap());
        assert_eq!(hidden, 2048);
    }
}
