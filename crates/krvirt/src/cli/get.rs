//! `get`: tables, `-o json|yaml|name`, `-w`.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use chrono::Utc;
use clap::Args;
use futures::StreamExt;
use krvirt_api::KindInfo;
use krvirt_client::{ListParams, ResumeOptions, WatchEventKind};
use serde_json::Value;

use super::output::{Output, json, name_line, render_objects, yaml};
use super::table::{self, Layout, TableOpts};
use super::{Ctx, out, parse_targets, print_error, required_kind};

#[derive(Debug, Args)]
pub struct GetArgs {
    /// KIND [NAME...] or KIND/NAME...
    #[arg(value_name = "KIND [NAME]", required = true)]
    pub args: Vec<String>,
    /// Output format
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
    /// Label selector, e.g. app=web,tier!=db
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Field selector, e.g. metadata.name=vm1
    #[arg(long, value_name = "SELECTOR")]
    pub field_selector: Option<String>,
    /// After listing, watch for changes and print them
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// List across all namespaces
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

fn key(obj: &Value) -> (String, String) {
    (table::namespace(obj), table::name(obj))
}

/// VMIs by (namespace, name), for the VM table's NODE and IP.
async fn vmis_for(ctx: &Ctx, params: &ListParams) -> Result<HashMap<(String, String), Value>> {
    let vmi = required_kind("virtualmachineinstances")?;
    let list = ctx
        .client
        .list(
            vmi,
            &ListParams {
                namespace: params.namespace.clone(),
                ..Default::default()
            },
        )
        .await?;
    Ok(list.items.into_iter().map(|v| (key(&v), v)).collect())
}

pub async fn get(ctx: &Ctx, args: GetArgs) -> Result<ExitCode> {
    let targets = parse_targets(&args.args)?;
    if args.watch && targets.len() > 1 {
        bail!("--watch takes one kind");
    }
    let namespace = if args.all_namespaces {
        None
    } else {
        Some(ctx.ns.name.clone())
    };
    let mut failed = false;
    let mut first_block = true;
    for (kind, names) in targets {
        let params = ListParams {
            namespace: namespace.clone(),
            label_selector: args.selector.clone(),
            field_selector: args.field_selector.clone(),
            ..Default::default()
        };
        let (objs, rv) = if names.is_empty() {
            let list = ctx.client.list(kind, &params).await?;
            (list.items, Some(list.resource_version))
        } else {
            if args.all_namespaces && kind.namespaced {
                bail!("a NAME cannot be combined with --all-namespaces");
            }
            let mut objs = Vec::new();
            for n in &names {
                match ctx.client.get(kind, &ctx.ns.name, n).await {
                    Ok(o) => objs.push(o),
                    Err(e) => {
                        failed = true;
                        print_error(&e.into());
                    }
                }
            }
            (objs, None)
        };
        let opts = TableOpts {
            wide: args.output == Some(Output::Wide),
            namespace_column: args.all_namespaces && kind.namespaced,
        };
        let layout = Layout::of(kind);
        let header = table::header(layout, opts);
        let mut rendered_rows = Vec::new();
        let text = match args.output {
            None | Some(Output::Wide) => {
                let vmis = if layout == Layout::Vm && opts.wide && !objs.is_empty() {
                    vmis_for(ctx, &params).await?
                } else {
                    HashMap::new()
                };
                let now = Utc::now();
                rendered_rows = objs
                    .iter()
                    .map(|o| table::row(layout, o, vmis.get(&key(o)), opts, now))
                    .collect();
                if objs.is_empty() {
                    String::new()
                } else {
                    table::render(&header, &rendered_rows, None)
                }
            }
            Some(format) => render_objects(format, kind, objs.clone(), names.len() == 1)?,
        };
        if objs.is_empty() && names.is_empty() && !args.watch {
            eprintln!("{}", no_resources(kind, args.all_namespaces, &ctx.ns.name));
        }
        if !first_block && !text.is_empty() && args.output.is_none_or(|o| o == Output::Wide) {
            out("\n")?;
        }
        out(&text)?;
        if !text.is_empty() {
            first_block = false;
        }
        if args.watch {
            let widths = table::widths(&header, &rendered_rows);
            let show_header = objs.is_empty();
            let wanted: Vec<String> = names.clone();
            let params = match rv {
                Some(rv) => params.at(rv),
                // Named objects were fetched one by one: watch from now.
                None => params,
            };
            watch(ctx, kind, params, &args, opts, widths, show_header, &wanted).await?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// kubectl's message for an empty list.
pub fn no_resources(kind: &KindInfo, all_namespaces: bool, ns: &str) -> String {
    if kind.namespaced && !all_namespaces {
        format!("No resources found in {ns} namespace.")
    } else {
        "No resources found".to_string()
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    ctx: &Ctx,
    kind: &'static KindInfo,
    params: ListParams,
    args: &GetArgs,
    opts: TableOpts,
    mut widths: Vec<usize>,
    mut show_header: bool,
    names: &[String],
) -> Result<()> {
    let layout = Layout::of(kind);
    let header = table::header(layout, opts);
    // The current state is already printed: report changes only.
    let resume = ResumeOptions {
        initial_list: false,
        ..Default::default()
    };
    let vmi_kind = required_kind("virtualmachineinstances").ok();
    let mut stream = ctx.client.watch_resumable(kind, &params, resume);
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        if matches!(ev.kind, WatchEventKind::Error | WatchEventKind::Bookmark) {
            continue;
        }
        let obj = ev.object;
        if !names.is_empty() && !names.contains(&table::name(&obj)) {
            continue;
        }
        let text = match args.output {
            None | Some(Output::Wide) => {
                let vmi = match (layout, opts.wide, vmi_kind) {
                    (Layout::Vm, true, Some(vk)) => {
                        let (ns, name) = key(&obj);
                        ctx.client.get(vk, &ns, &name).await.ok()
                    }
                    _ => None,
                };
                let row = vec![table::row(layout, &obj, vmi.as_ref(), opts, Utc::now())];
                let h: &[String] = if show_header { &header } else { &[] };
                if show_header {
                    widths = table::widths(&header, &row);
                    show_header = false;
                }
                table::render(h, &row, Some(&widths))
            }
            Some(Output::Name) => name_line(kind, &obj),
            Some(Output::Json) => json(&obj)?,
            Some(Output::Yaml) => format!("---\n{}", yaml(&obj)?),
        };
        out(&text)?;
    }
    Ok(())
}
