//! `addvolume` / `removevolume` (virtctl's verbs): hot-plug a krvirt Volume
//! into a running VM and take it out again. The request is recorded on the
//! VMI (annotation `krvirt.io/hotplug-volumes`); the host agent attaches or
//! detaches the disk and reports it in the VMI's `status.volumeStatus`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use krvirt_api::storage::{HOTPLUG_ANNOTATION, check_disk_name, hotplug_requests};
use krvirt_client::PatchTarget;
use serde_json::json;

use super::{Ctx, out, required_kind};

#[derive(Debug, Args)]
pub struct AddVolumeArgs {
    /// VirtualMachine (or VirtualMachineInstance) name
    pub name: String,
    /// The Volume to attach
    #[arg(long)]
    pub volume: String,
    /// Disk name in the VMI (default: the Volume's name)
    #[arg(long)]
    pub disk: Option<String>,
}

#[derive(Debug, Args)]
pub struct RemoveVolumeArgs {
    /// VirtualMachine (or VirtualMachineInstance) name
    pub name: String,
    /// The hot-plugged Volume (or its disk name) to detach
    #[arg(long)]
    pub volume: String,
}

async fn requests(ctx: &Ctx, name: &str) -> Result<BTreeMap<String, String>> {
    let kind = required_kind("virtualmachineinstances")?;
    let vmi = ctx.client.get(kind, &ctx.ns.name, name).await?;
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(vmi["metadata"]["annotations"].clone()).unwrap_or_default();
    hotplug_requests(&annotations).map_err(|e| anyhow!(e))
}

async fn store(ctx: &Ctx, name: &str, req: &BTreeMap<String, String>) -> Result<()> {
    let kind = required_kind("virtualmachineinstances")?;
    let value = if req.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::to_string(req)?.into()
    };
    ctx.client
        .merge_patch(
            kind,
            &ctx.ns.name,
            name,
            &json!({"metadata": {"annotations": {HOTPLUG_ANNOTATION: value}}}),
            PatchTarget::Main,
        )
        .await?;
    Ok(())
}

pub async fn add(ctx: &Ctx, a: AddVolumeArgs) -> Result<ExitCode> {
    let vol_kind = required_kind("volumes")?;
    ctx.client.get(vol_kind, &ctx.ns.name, &a.volume).await?;
    let disk = a.disk.unwrap_or_else(|| a.volume.clone());
    check_disk_name(&disk).map_err(|e| anyhow!("disk name {e}"))?;
    let mut req = requests(ctx, &a.name).await?;
    if let Some(other) = req.get(&disk)
        && *other != a.volume
    {
        bail!("disk {disk:?} already holds Volume {other:?}");
    }
    if let Some((d, _)) = req.iter().find(|(d, v)| **v == a.volume && **d != disk) {
        bail!("Volume {:?} is already attached as disk {d:?}", a.volume);
    }
    req.insert(disk.clone(), a.volume.clone());
    store(ctx, &a.name, &req).await?;
    out(&format!(
        "Volume {} was scheduled to attach to {} as disk {disk}\n",
        a.volume, a.name
    ))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn remove(ctx: &Ctx, a: RemoveVolumeArgs) -> Result<ExitCode> {
    let mut req = requests(ctx, &a.name).await?;
    let before = req.len();
    req.retain(|d, v| *d != a.volume && *v != a.volume);
    if req.len() == before {
        bail!("{:?} is not hot-plugged into {}", a.volume, a.name);
    }
    store(ctx, &a.name, &req).await?;
    out(&format!(
        "Volume {} was scheduled to detach from {}\n",
        a.volume, a.name
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `krvirt volume …`
#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    pub cmd: VolumeCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// Fill an `upload` Volume with a local disk image (raw or qcow2),
    /// streamed to the server
    Upload {
        /// The Volume (its spec.source is `upload: {}`)
        name: String,
        file: std::path::PathBuf,
        /// Refuse it unless it hashes to this sha256:… digest
        #[arg(long)]
        digest: Option<String>,
    },
}

pub async fn volume(ctx: &Ctx, args: VolumeArgs) -> Result<ExitCode> {
    match args.cmd {
        VolumeCommand::Upload { name, file, digest } => {
            let f = tokio::fs::File::open(&file)
                .await
                .map_err(|e| anyhow!("opening {}: {e}", file.display()))?;
            let len = f.metadata().await?.len();
            let mut url = reqwest::Url::parse(&format!(
                "{}/apis/volumes.krvirt.io/v1/namespaces/{}/volumes/{name}/upload",
                ctx.client.request_base(),
                ctx.ns.name
            ))?;
            if let Some(d) = digest {
                url.query_pairs_mut().append_pair("digest", &d);
            }
            let resp = ctx
                .client
                .http()
                .put(url)
                .header("content-type", "application/octet-stream")
                .header("content-length", len)
                .body(reqwest::Body::wrap_stream(
                    tokio_util::io::ReaderStream::with_capacity(f, 1 << 20),
                ))
                .send()
                .await?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            if !status.is_success() {
                bail!(
                    "{}",
                    v["message"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("upload failed: HTTP {status}"))
                );
            }
            out(&format!(
                "volume/{name} uploaded ({} bytes, {}); the host agent copies it into the pool\n",
                v["size"].as_u64().unwrap_or(len),
                v["digest"].as_str().unwrap_or_default()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
