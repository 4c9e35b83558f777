//! ResourceQuota enforcement at admission: creating a VirtualMachine, a
//! VirtualMachineInstance or a Volume in a namespace with quotas is
//! refused (403 Forbidden, naming the quota, the resource, what was
//! requested, used and allowed) when it would go over a hard limit.
//!
//! Usage is computed from the namespace's objects at each create: VMs,
//! plus VMIs that no VM owns (a VM's VMI is counted through its VM), and
//! Volumes. vCPUs count `domain.resources.requests.cpu`, else
//! cores × sockets × threads; memory counts
//! `domain.resources.requests.memory`, else `domain.memory.guest`.
//! Replacing or merge-patching an object is checked for what it adds
//! (growing a VM's vCPUs over the quota is refused; shrinking never is).
//! (Concurrent writes may both pass: the check is not transactional.)

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use krvirt_api::quantity::{parse_cpu_millis, parse_quantity};
use serde_json::{Value, json};

use crate::ApiError;
use crate::rbac::Attrs;
use crate::registry::Registry;
use crate::selector::Selector;

/// Whether a request is subject to quotas: creates, and replacing or
/// merge-patching the object itself (not its status).
pub fn applies(a: &Attrs) -> bool {
    matches!(a.verb.as_str(), "create" | "update" | "patch")
        && matches!(
            (a.group.as_str(), a.resource.as_str()),
            ("kubevirt.io", "virtualmachines")
                | ("kubevirt.io", "virtualmachineinstances")
                | ("krvirt.io", "volumes")
        )
}

/// What one object consumes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millis: u64,
    pub cpu_limit_millis: u64,
    pub memory: u64,
    pub memory_limit: u64,
    pub storage: u64,
    pub vms: u64,
    pub vmis: u64,
}

impl Usage {
    /// What `self` holds beyond `o` (per resource, never negative).
    fn minus(&self, o: &Usage) -> Usage {
        Usage {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            cpu_limit_millis: self.cpu_limit_millis.saturating_sub(o.cpu_limit_millis),
            memory: self.memory.saturating_sub(o.memory),
            memory_limit: self.memory_limit.saturating_sub(o.memory_limit),
            storage: self.storage.saturating_sub(o.storage),
            vms: self.vms.saturating_sub(o.vms),
            vmis: self.vmis.saturating_sub(o.vmis),
        }
    }

    fn add(&mut self, o: &Usage) {
        self.cpu_millis += o.cpu_millis;
        self.cpu_limit_millis += o.cpu_limit_millis;
        self.memory += o.memory;
        self.memory_limit += o.memory_limit;
        self.storage += o.storage;
        self.vms += o.vms;
        self.vmis += o.vmis;
    }

    fn get(&self, resource: &str) -> Option<u64> {
        Some(match resource {
            "requests.cpu" => self.cpu_millis,
            "limits.cpu" => self.cpu_limit_millis,
            "requests.memory" => self.memory,
            "limits.memory" => self.memory_limit,
            "requests.storage" => self.storage,
            "count/virtualmachines.kubevirt.io" => self.vms,
            "count/virtualmachineinstances.kubevirt.io" => self.vmis,
            _ => return None,
        })
    }
}

fn domain_usage(domain: &Value) -> (u64, u64, u64, u64) {
    let cpu = &domain["cpu"];
    let n = |k: &str| cpu[k].as_u64().unwrap_or(1).max(1);
    let vcpus_millis = n("cores") * n("sockets") * n("threads") * 1000;
    let res = &domain["resources"];
    let q = |v: &Value, cpu: bool| {
        v.as_str()
            .map(|s| s.to_string())
            .or_else(|| v.as_u64().map(|n| n.to_string()))
            .and_then(|s| {
                if cpu {
                    parse_cpu_millis(&s).ok()
                } else {
                    parse_quantity(&s).ok()
                }
            })
    };
    let cpu_req = q(&res["requests"]["cpu"], true).unwrap_or(vcpus_millis);
    let cpu_lim = q(&res["limits"]["cpu"], true).unwrap_or(cpu_req);
    let mem_req = q(&res["requests"]["memory"], false)
        .or_else(|| q(&domain["memory"]["guest"], false))
        .unwrap_or(0);
    let mem_lim = q(&res["limits"]["memory"], false).unwrap_or(mem_req);
    (cpu_req, cpu_lim, mem_req, mem_lim)
}

/// Usage of one VM, VMI or Volume object.
pub fn usage_of(resource: &str, obj: &Value) -> Usage {
    match resource {
        "virtualmachines" => {
            let (c, cl, m, ml) = domain_usage(&obj["spec"]["template"]["spec"]["domain"]);
            Usage {
                cpu_millis: c,
                cpu_limit_millis: cl,
                memory: m,
                memory_limit: ml,
                vms: 1,
                ..Default::default()
            }
        }
        "virtualmachineinstances" => {
            let (c, cl, m, ml) = domain_usage(&obj["spec"]["domain"]);
            Usage {
                cpu_millis: c,
                cpu_limit_millis: cl,
                memory: m,
                memory_limit: ml,
                vmis: 1,
                ..Default::default()
            }
        }
        "volumes" => Usage {
            storage: obj["spec"]["capacity"]
                .as_str()
                .and_then(|s| parse_quantity(s).ok())
                .unwrap_or(0),
            ..Default::default()
        },
        _ => Usage::default(),
    }
}

async fn namespace_usage(reg: &Registry, ns: &str) -> Result<Usage, ApiError> {
    let mut total = Usage::default();
    let sel = Selector::default();
    for plural in ["virtualmachines", "virtualmachineinstances", "volumes"] {
        let Some(kind) = krvirt_api::find_kind(plural) else {
            continue;
        };
        for o in reg.list(kind, Some(ns), &sel).await?.0 {
            if plural == "virtualmachineinstances" {
                let owned = o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|r| r["kind"] == "VirtualMachine"));
                if owned {
                    // counted through its VM, except the VMI count
                    total.vmis += 1;
                    continue;
                }
            }
            total.add(&usage_of(plural, &o));
        }
    }
    Ok(total)
}

fn show(resource: &str, v: u64) -> String {
    if resource.ends_with(".cpu") {
        if v.is_multiple_of(1000) {
            format!("{}", v / 1000)
        } else {
            format!("{v}m")
        }
    } else {
        v.to_string()
    }
}

fn parse_hard(resource: &str, v: &str) -> Option<u64> {
    if resource.ends_with(".cpu") {
        parse_cpu_millis(v).ok()
    } else {
        parse_quantity(v).ok()
    }
}

fn forbidden(msg: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": msg, "reason": "Forbidden", "code": 403,
    });
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

/// Check a create against `quotas` (name → hard limits); hands the
/// request back (body restored) when it fits.
pub async fn admit(
    reg: &Registry,
    quotas: &BTreeMap<String, BTreeMap<String, String>>,
    a: &Attrs,
    req: Request,
) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, crate::MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::TooLarge(format!("cannot read the body: {e}")).into_response())?;
    let is_yaml = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("yaml"));
    let obj: Option<Value> = if is_yaml {
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| serde_saphyr::from_str(s).ok())
    } else {
        serde_json::from_slice(&bytes).ok()
    };
    // An unparsable body is refused by the handler with the right error.
    if let Some(body) = obj {
        // For a write to an existing object: what it holds now, and what
        // it will hold.
        let old = if a.verb == "create" {
            None
        } else {
            match krvirt_api::find_kind(&a.resource) {
                Some(kind) => reg.get(kind, &a.namespace, &a.name).await.ok(),
                None => None,
            }
        };
        let obj = match (&old, a.verb.as_str()) {
            (Some(old), "patch") => {
                let mut merged = old.clone();
                crate::patch::merge_patch(&mut merged, &body);
                merged
            }
            _ => body,
        };
        let new = usage_of(&a.resource, &obj);
        let prev = old
            .as_ref()
            .map(|o| usage_of(&a.resource, o))
            .unwrap_or_default();
        let mut used = namespace_usage(reg, &a.namespace)
            .await
            .map_err(IntoResponse::into_response)?;
        let before = used;
        let want = new.minus(&prev);
        used.add(&want);
        for (qname, hard) in quotas {
            for (res, limit) in hard {
                let (Some(limit), Some(after), Some(now), Some(req)) = (
                    parse_hard(res, limit),
                    used.get(res),
                    before.get(res),
                    want.get(res),
                ) else {
                    continue;
                };
                if req > 0 && after > limit {
                    return Err(forbidden(format!(
                        "{} {:?} is forbidden: exceeded quota: {qname}, requested: {res}={}, used: {res}={}, limited: {res}={}",
                        a.resource,
                        obj["metadata"]["name"].as_str().unwrap_or_default(),
                        show(res, req),
                        show(res, now),
                        show(res, limit),
                    )));
                }
            }
        }
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}
