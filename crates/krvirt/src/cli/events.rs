//! `krvirt events [-w] [--for KIND/NAME] [-A]`: what happened to objects,
//! newest last (as `kubectl events`).

use std::process::ExitCode;

use anyhow::{Result, anyhow};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::StreamExt;
use krvirt_client::{Client, ListParams, WatchEventKind};
use serde_json::Value;

use super::table::{self, age};
use super::{Ctx, out, required_kind};

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// After the list, keep printing new events
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Only events about this object: KIND/NAME (vm/web, vmi/web, host/h1)
    #[arg(long = "for", value_name = "KIND/NAME")]
    pub for_object: Option<String>,
    /// Events of every namespace
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

fn last_seen(e: &Value) -> String {
    for p in [
        "/lastTimestamp",
        "/firstTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ] {
        if !s(e, p).is_empty() {
            return s(e, p).to_string();
        }
    }
    String::new()
}

/// Events sorted oldest first.
pub fn sort_events(events: &mut [Value]) {
    events.sort_by_key(|e| (last_seen(e), s(e, "/metadata/name").to_string()));
}

/// `3s`, or `10s (x4 over 2m)` for an aggregated event.
pub fn seen(e: &Value, now: DateTime<Utc>) -> String {
    let last = last_seen(e);
    let a = age(Some(&last), now);
    let count = e.get("count").and_then(Value::as_i64).unwrap_or(1);
    if count > 1 {
        let first = s(e, "/firstTimestamp");
        format!("{a} (x{count} over {})", age(Some(first), now))
    } else {
        a
    }
}

/// `source.component`, with `, host` when set.
pub fn from(e: &Value) -> String {
    let c = s(e, "/source/component");
    let c = if c.is_empty() {
        s(e, "/reportingComponent")
    } else {
        c
    };
    match s(e, "/source/host") {
        "" => c.to_string(),
        h => format!("{c}, {h}"),
    }
}

/// The events about objects named `name` of the given kinds in `ns`.
pub async fn events_for(
    client: &Client,
    ns: &str,
    kinds: &[&str],
    name: &str,
) -> Result<Vec<Value>> {
    let ek = required_kind("events")?;
    let params = ListParams::namespaced(ns).fields(format!("involvedObject.name={name}"));
    let mut items: Vec<Value> = client
        .list(ek, &params)
        .await?
        .items
        .into_iter()
        .filter(|e| kinds.contains(&s(e, "/involvedObject/kind")))
        .collect();
    sort_events(&mut items);
    Ok(items)
}

fn row(e: &Value, now: DateTime<Utc>, with_ns: bool) -> Vec<String> {
    let mut r = Vec::new();
    if with_ns {
        r.push(s(e, "/metadata/namespace").to_string());
    }
    let kind = s(e, "/involvedObject/kind");
    let short = krvirt_api::find_kind(kind)
        .map(|k| k.singular)
        .unwrap_or(kind)
        .to_string();
    r.extend([
        seen(e, now),
        s(e, "/type").to_string(),
        s(e, "/reason").to_string(),
        format!("{short}/{}", s(e, "/involvedObject/name")),
        s(e, "/message").to_string(),
    ]);
    r
}

fn header(with_ns: bool) -> Vec<String> {
    let mut h = Vec::new();
    if with_ns {
        h.push("NAMESPACE".to_string());
    }
    h.extend(
        ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
            .iter()
            .map(|s| s.to_string()),
    );
    h
}

pub async fn events(ctx: &Ctx, args: EventsArgs) -> Result<ExitCode> {
    let ek = required_kind("events")?;
    let mut params = if args.all_namespaces {
        ListParams::all_namespaces()
    } else {
        ListParams::namespaced(ctx.ns.name.clone())
    };
    let mut kind_filter: Option<String> = None;
    if let Some(f) = &args.for_object {
        let (k, name) = f
            .split_once('/')
            .ok_or_else(|| anyhow!("--for {f:?}: expected KIND/NAME, e.g. vm/web"))?;
        let kind =
            krvirt_api::find_kind(k).ok_or_else(|| anyhow!("--for {f:?}: unknown kind {k:?}"))?;
        params = params.fields(format!(
            "involvedObject.kind={},involvedObject.name={name}",
            kind.kind
        ));
        kind_filter = Some(kind.kind.to_string());
    }
    let list = ctx.client.list(ek, &params).await?;
    let mut items = list.items;
    sort_events(&mut items);
    let now = Utc::now();
    let with_ns = args.all_namespaces;
    let rows: Vec<Vec<String>> = items.iter().map(|e| row(e, now, with_ns)).collect();
    if rows.is_empty() && !args.watch {
        out("No events found.\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let h = header(with_ns);
    out(&table::render(&h, &rows, None))?;
    if !args.watch {
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = ctx
        .client
        .watch(ek, &params.at(list.resource_version))
        .await?;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        match ev.kind {
            WatchEventKind::Added | WatchEventKind::Modified => {
                if let Some(k) = &kind_filter
                    && s(&ev.object, "/involvedObject/kind") != k
                {
                    continue;
                }
                let r = row(&ev.object, Utc::now(), with_ns);
                out(&format!("{}\n", r.join("   ")))?;
            }
            WatchEventKind::Error => {
                return Err(anyhow!(
                    "the watch failed: {}",
                    ev.status().map(|s| s.message).unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}
