//! `krvirt image list|import|upload|tag|inspect|rm|gc|verify`: the image
//! service of the server (`/apis/images.krvirt.io/v1`).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

use super::{Ctx, out};

/// `krvirt image …`
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub cmd: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images: every name:tag with its digest
    #[command(alias = "ls")]
    List {
        /// Output: table (default) or json
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Import from a URL (http/https), a registry (docker://REF, a KubeVirt
    /// containerDisk) or a path on the server's host
    Import {
        /// http(s)://…, docker://REGISTRY/REPO:TAG, or /absolute/path
        source: String,
        /// name:tag to give it (docker:// defaults to the repository's last component and tag)
        #[arg(long)]
        name: Option<String>,
        /// Layer it (a qcow2 overlay) on this image (name:tag)
        #[arg(long)]
        base: Option<String>,
        /// Refuse it unless it hashes to this sha256:… digest
        #[arg(long)]
        digest: Option<String>,
    },
    /// Upload a local file to the server (streamed, with progress)
    Upload {
        file: std::path::PathBuf,
        /// name:tag to give it
        #[arg(long)]
        name: String,
        /// Layer it (a qcow2 overlay) on this image (name:tag)
        #[arg(long)]
        base: Option<String>,
        /// Refuse it unless it hashes to this sha256:… digest
        #[arg(long)]
        digest: Option<String>,
        /// No progress bar
        #[arg(long)]
        quiet: bool,
    },
    /// Give an image (name:tag or sha256:…) another tag
    Tag { source: String, target: String },
    /// Show an image's digest, layer chain and tag history
    Inspect {
        image: String,
        /// Output: text (default) or json
        #[arg(short = 'o', long, default_value = "text")]
        output: String,
    },
    /// Remove a tag (blobs go with `krvirt image gc`)
    Rm {
        image: String,
        /// Every tag of the image
        #[arg(long)]
        all: bool,
    },
    /// Remove blobs no tag, layer or VM uses
    Gc,
    /// Re-hash an image's blobs now
    Verify { image: String },
}

fn base(ctx: &Ctx) -> String {
    format!("{}/apis/images.krvirt.io/v1", ctx.client.request_base())
}

async fn check(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .with_context(|| format!("image service answered {status} without JSON"))?;
    if !status.is_success() {
        let msg = v
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        bail!("{msg}");
    }
    Ok(v)
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{x:.1}{}", units[i])
    }
}

fn short(d: &str) -> &str {
    let h = d.strip_prefix("sha256:").unwrap_or(d);
    &h[..h.len().min(12)]
}

pub async fn image(ctx: &Ctx, args: ImageArgs) -> Result<ExitCode> {
    let http = ctx.client.http().clone();
    let base = base(ctx);
    match args.cmd {
        ImageCommand::List { output } => {
            let v = check(http.get(format!("{base}/images")).send().await?).await?;
            if output == "json" {
                out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
                return Ok(ExitCode::SUCCESS);
            }
            let header: Vec<String> = ["NAME", "TAG", "DIGEST", "SIZE", "FORMAT", "BASE", "STATUS"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let mut rows = Vec::new();
            for r in v.as_array().into_iter().flatten() {
                let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                rows.push(vec![
                    s("name"),
                    s("tag"),
                    short(&s("digest")).to_string(),
                    human(r.get("size").and_then(Value::as_u64).unwrap_or(0)),
                    s("format"),
                    r.get("parent")
                        .and_then(Value::as_str)
                        .map(|p| short(p).to_string())
                        .unwrap_or_default(),
                    if r.get("failure").is_some() {
                        "CORRUPT".into()
                    } else {
                        "ok".into()
                    },
                ]);
            }
            out(&super::table::render(&header, &rows, None))?;
        }
        ImageCommand::Import {
            source,
            name,
            base: b,
            digest,
        } => {
            let v = check(
                http.post(format!("{base}/import"))
                    .json(&json!({"image": name, "source": source, "base": b, "digest": digest}))
                    .send()
                    .await?,
            )
            .await?;
            print_imported(&v)?;
        }
        ImageCommand::Upload {
            file,
            name,
            base: b,
            digest,
            quiet,
        } => {
            let f = tokio::fs::File::open(&file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata().await?.len();
            let bar = if quiet {
                indicatif::ProgressBar::hidden()
            } else {
                let b = indicatif::ProgressBar::new(len);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_message(format!("uploading {}", file.display()));
                b
            };
            let pb = bar.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect(move |c| {
                    if let Ok(c) = c {
                        pb.inc(c.len() as u64);
                    }
                });
            let mut q = vec![
                ("image", name),
                ("source", format!("upload of {}", file.display())),
            ];
            if let Some(b) = b {
                q.push(("base", b));
            }
            if let Some(d) = digest {
                q.push(("digest", d));
            }
            let url = reqwest::Url::parse_with_params(&format!("{base}/upload"), &q)?;
            let resp = http
                .post(url)
                .header("content-type", "application/octet-stream")
                .header("content-length", len)
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await;
            bar.finish_and_clear();
            let v = check(resp?).await?;
            print_imported(&v)?;
        }
        ImageCommand::Tag { source, target } => {
            let v = check(
                http.post(format!("{base}/tag"))
                    .json(&json!({"source": source, "target": target}))
                    .send()
                    .await?,
            )
            .await?;
            out(&format!(
                "{} -> {}\n",
                v["image"].as_str().unwrap_or_default(),
                v["digest"].as_str().unwrap_or_default()
            ))?;
        }
        ImageCommand::Inspect { image, output } => {
            let v = check(http.get(format!("{base}/images/{image}")).send().await?).await?;
            if output == "json" {
                out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut s = format!(
                "Image:  {}\nDigest: {}\nChain (top first):\n",
                v["image"].as_str().unwrap_or_default(),
                v["digest"].as_str().unwrap_or_default()
            );
            for (i, c) in v["chain"].as_array().into_iter().flatten().enumerate() {
                let tags: Vec<&str> = c["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                s.push_str(&format!(
                    "  {}{} {} {} [{}] from {}\n",
                    "  ".repeat(i),
                    if i == 0 { "" } else { "└─" },
                    c["digest"].as_str().unwrap_or_default(),
                    c["format"].as_str().unwrap_or_default(),
                    tags.join(", "),
                    c["source"].as_str().unwrap_or_default(),
                ));
            }
            s.push_str("History:\n");
            for e in v["history"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "  {} {} -> {}{}\n",
                    e["time"].as_str().unwrap_or_default(),
                    e["tag"].as_str().unwrap_or_default(),
                    e["digest"].as_str().unwrap_or("(removed)"),
                    e["previous"]
                        .as_str()
                        .map(|p| format!(" (was {})", short(p)))
                        .unwrap_or_default()
                ));
            }
            out(&s)?;
        }
        ImageCommand::Rm { image, all } => {
            let v = check(
                http.delete(format!("{base}/images/{image}?all={all}"))
                    .send()
                    .await?,
            )
            .await?;
            for t in v["untagged"].as_array().into_iter().flatten() {
                out(&format!("untagged {}\n", t.as_str().unwrap_or_default()))?;
            }
        }
        ImageCommand::Gc => {
            let v = check(http.post(format!("{base}/gc")).send().await?).await?;
            for d in v["removed"].as_array().into_iter().flatten() {
                out(&format!("removed {}\n", d.as_str().unwrap_or_default()))?;
            }
            for d in v["keptInUse"].as_array().into_iter().flatten() {
                out(&format!(
                    "kept {} (a VM disk uses it)\n",
                    d.as_str().unwrap_or_default()
                ))?;
            }
            out(&format!(
                "freed {}\n",
                human(v["freedBytes"].as_u64().unwrap_or(0))
            ))?;
        }
        ImageCommand::Verify { image } => {
            let v = check(http.post(format!("{base}/verify/{image}")).send().await?).await?;
            out(&format!(
                "{image}: {} verified\n",
                v["digest"].as_str().unwrap_or_default()
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_imported(v: &Value) -> Result<()> {
    out(&format!(
        "{} {} ({}, {}){}\n",
        v["image"].as_str().unwrap_or_default(),
        v["digest"].as_str().unwrap_or_default(),
        v["format"].as_str().unwrap_or_default(),
        human(v["size"].as_u64().unwrap_or(0)),
        v["parent"]
            .as_str()
            .map(|p| format!(", layered on {p}"))
            .unwrap_or_default()
    ))
}
