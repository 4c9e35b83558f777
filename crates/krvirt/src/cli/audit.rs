//! `krvirt audit verify|show`: read the audit log of a data directory
//! (local file access; the server need not run).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use krvirt_server::audit::{read_records, verify_file};

use super::out;

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; names the first edited, removed or reordered record
    Verify(AuditFile),
    /// Print the records
    Show(AuditFile),
}

#[derive(Debug, Clone, Args)]
pub struct AuditFile {
    /// Data directory of the krvirt instance (its audit.log) [default: as `krvirt up`]
    #[arg(long, env = "KRVIRT_DATA_DIR", conflicts_with = "file")]
    pub data_dir: Option<PathBuf>,
    /// The audit log file itself
    #[arg(long)]
    pub file: Option<PathBuf>,
}

impl AuditFile {
    fn path(&self) -> PathBuf {
        match (&self.file, &self.data_dir) {
            (Some(f), _) => f.clone(),
            (None, Some(d)) => crate::daemon::audit_path(d),
            (None, None) => crate::daemon::audit_path(&crate::daemon::default_data_dir()),
        }
    }
}

pub async fn audit(args: AuditArgs) -> Result<ExitCode> {
    match args.command {
        AuditCommand::Verify(f) => {
            let path = f.path();
            let v = verify_file(&path).with_context(|| format!("verifying {}", path.display()))?;
            match v.first_bad {
                None => {
                    out(&format!(
                        "{}: {} records, chain intact\n",
                        path.display(),
                        v.valid
                    ))?;
                    Ok(ExitCode::SUCCESS)
                }
                Some(bad) => {
                    let seq = bad
                        .seq
                        .map(|s| format!("record {s}"))
                        .unwrap_or_else(|| "an unreadable record".into());
                    eprintln!(
                        "{}: TAMPERED: first bad record is {seq} at line {}: {} ({} records before it verify)",
                        path.display(),
                        bad.line,
                        bad.problem,
                        v.valid
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Show(f) => {
            let path = f.path();
            let recs =
                read_records(&path).with_context(|| format!("reading {}", path.display()))?;
            let header: Vec<String> = [
                "SEQ",
                "TIME",
                "REQUEST ID",
                "USER",
                "SOURCE",
                "VERB",
                "OBJECT",
                "CODE",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let rows: Vec<Vec<String>> = recs
                .iter()
                .map(|r| {
                    let e = &r.entry;
                    let mut obj = e.resource.clone();
                    if !e.group.is_empty() {
                        obj = format!("{obj}.{}", e.group);
                    }
                    if !e.namespace.is_empty() {
                        obj = format!("{}/{obj}", e.namespace);
                    }
                    if !e.name.is_empty() {
                        obj = format!("{obj}/{}", e.name);
                    }
                    if !e.subresource.is_empty() {
                        obj = format!("{obj}/{}", e.subresource);
                    }
                    vec![
                        r.seq.to_string(),
                        e.time.clone(),
                        e.request_id.clone(),
                        e.user.clone(),
                        e.source.clone(),
                        e.verb.clone(),
                        obj,
                        e.code.to_string(),
                    ]
                })
                .collect();
            out(&super::table::render(&header, &rows, None))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
