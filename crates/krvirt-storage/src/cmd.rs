//! Running the storage tools.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::{Format, Result, StorageError};

/// Run `program args…`, returning stdout; a non-zero exit is an error
/// carrying stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(program)
        .args(&args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| StorageError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(StorageError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct ImgInfo {
    pub virtual_size: u64,
    #[serde(default)]
    pub actual_size: u64,
    #[serde(default)]
    pub snapshots: Vec<ImgSnapshot>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImgSnapshot {
    pub name: String,
}

/// `qemu-img info --output=json` (`-U`: also works while QEMU holds the file).
pub(crate) fn qemu_img_info(path: &Path, format: Option<Format>) -> Result<ImgInfo> {
    let mut args: Vec<&OsStr> = vec!["info".as_ref(), "-U".as_ref(), "--output=json".as_ref()];
    if let Some(f) = format {
        args.push("-f".as_ref());
        args.push(f.as_str().as_ref());
    }
    args.push(path.as_os_str());
    let out = run("qemu-img", &args)?;
    serde_json::from_str(&out).map_err(|e| StorageError::Output {
        command: format!("qemu-img info {}", path.display()),
        message: e.to_string(),
    })
}

/// Absolute form of a path (qcow2 backing references must not depend on
/// the current directory).
pub(crate) fn absolute(p: &Path) -> Result<std::path::PathBuf> {
    std::path::absolute(p).map_err(|e| StorageError::io(p, e))
}
