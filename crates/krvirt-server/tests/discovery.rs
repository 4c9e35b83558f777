//! Discovery documents, /version, health, and the generated OpenAPI
//! document, against the real krvirt-api kinds.

mod common;

use common::*;
use serde_json::Value;

fn resource<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("resource {name} missing in {list}"))
}

#[tokio::test]
async fn discovery_documents() {
    let s = TestServer::real().await;
    let (code, api) = s.get(&s.url("/api")).await;
    assert_eq!(code, 200);
    assert_eq!(api["kind"], "APIVersions");
    assert_eq!(api["versions"], serde_json::json!(["v1"]));
    let (code, core) = s.get(&s.url("/api/v1")).await;
    assert_eq!(code, 200);
    assert_eq!(core["kind"], "APIResourceList");
    assert_eq!(core["groupVersion"], "v1");

    let (code, apis) = s.get(&s.url("/apis")).await;
    assert_eq!(code, 200);
    assert_eq!(apis["kind"], "APIGroupList");
    let groups: Vec<&str> = apis["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    // Named groups are listed under /apis; the core group ("") is /api/v1.
    let core_resources: Vec<&str> = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    for kind in krvirt_api::kinds() {
        if kind.group.is_empty() {
            assert!(
                core_resources.contains(&kind.plural),
                "{} missing from /api/v1: {core_resources:?}",
                kind.plural
            );
        } else {
            assert!(
                groups.contains(&kind.group),
                "{} missing from {groups:?}",
                kind.group
            );
        }
    }
    assert!(groups.contains(&"subresources.kubevirt.io"));
    let kv = apis["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "kubevirt.io")
        .unwrap();
    assert_eq!(kv["preferredVersion"]["groupVersion"], "kubevirt.io/v1");
    assert_eq!(kv["versions"][0]["version"], "v1");

    let (code, group) = s.get(&s.url("/apis/kubevirt.io")).await;
    assert_eq!(code, 200);
    assert_eq!(group["kind"], "APIGroup");
    assert_eq!(group["name"], "kubevirt.io");

    for kind in krvirt_api::kinds() {
        let gv_path = if kind.group.is_empty() {
            format!("/api/{}", kind.version)
        } else {
            format!("/apis/{}/{}", kind.group, kind.version)
        };
        let (code, list) = s.get(&s.url(&gv_path)).await;
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "APIResourceList");
        assert_eq!(list["groupVersion"], kind.api_version());
        let r = resource(&list, kind.plural);
        assert_eq!(r["kind"], kind.kind);
        assert_eq!(r["namespaced"], kind.namespaced);
        assert_eq!(r["singularName"], kind.singular);
        let verbs: Vec<&str> = r["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for v in [
            "create", "delete", "get", "list", "patch", "update", "watch",
        ] {
            assert!(verbs.contains(&v), "{} lacks verb {v}", kind.plural);
        }
        let shorts: Vec<&str> = r["shortNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(shorts, kind.short_names);
        let st = resource(&list, &format!("{}/status", kind.plural));
        assert_eq!(st["verbs"], serde_json::json!(["get", "patch", "update"]));
    }

    let (code, subs) = s.get(&s.url("/apis/subresources.kubevirt.io/v1")).await;
    assert_eq!(code, 200);
    for name in [
        "virtualmachines/start",
        "virtualmachines/stop",
        "virtualmachines/restart",
        "virtualmachineinstances/pause",
        "virtualmachineinstances/unpause",
    ] {
        assert_eq!(
            resource(&subs, name)["verbs"],
            serde_json::json!(["update"])
        );
    }
    for name in [
        "virtualmachineinstances/console",
        "virtualmachineinstances/consolelog",
    ] {
        assert_eq!(resource(&subs, name)["verbs"], serde_json::json!(["get"]));
    }

    // YAML discovery too
    let r = s
        .client
        .get(s.url("/apis"))
        .header("Accept", "application/yaml")
        .send()
        .await
        .unwrap();
    let y: Value = serde_saphyr::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(y, apis);
}

#[tokio::test]
async fn version_and_health() {
    let s = TestServer::real().await;
    let (code, v) = s.get(&s.url("/version")).await;
    assert_eq!(code, 200);
    assert_eq!(v["gitVersion"], format!("v{}", env!("CARGO_PKG_VERSION")));
    assert!(v["platform"].as_str().unwrap().contains('/'));
    for p in ["/healthz", "/readyz", "/livez"] {
        let r = s.client.get(s.url(p)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{p}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // readyz reflects the store
    s.store.close();
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_document_lists_every_kind() {
    let s = TestServer::real().await;
    let r = s.client.get(s.url("/openapi/v3")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    // parses as an OpenAPI document
    let typed: utoipa::openapi::OpenApi = serde_json::from_str(&text).expect("OpenAPI 3 document");
    assert!(!typed.paths.paths.is_empty());
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();

    for k in krvirt_api::kinds() {
        let base = if k.group.is_empty() {
            format!("/api/{}", k.version)
        } else {
            format!("/apis/{}/{}", k.group, k.version)
        };
        let (coll, obj) = if k.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", k.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", k.plural),
            )
        } else {
            (
                format!("{base}/{}", k.plural),
                format!("{base}/{}/{{name}}", k.plural),
            )
        };
        let p = &paths[&coll];
        assert!(p["get"].is_object() && p["post"].is_object(), "{coll}");
        let params: Vec<&str> = p["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        for q in ["labelSelector", "fieldSelector", "watch", "resourceVersion"] {
            assert!(params.contains(&q), "{coll} lacks {q}");
        }
        assert_eq!(
            p["post"]["responses"]["201"]["content"]["application/json"]["schema"]["$ref"],
            format!("#/components/schemas/{}", k.schema_name)
        );
        for m in ["get", "put", "patch", "delete"] {
            assert!(paths[&obj][m].is_object(), "{obj} {m}");
        }
        assert!(
            paths[&obj]["patch"]["requestBody"]["content"]["application/merge-patch+json"]
                .is_object()
        );
        for m in ["get", "put", "patch"] {
            assert!(
                paths[&format!("{obj}/status")][m].is_object(),
                "{obj}/status {m}"
            );
        }
        if k.namespaced {
            assert!(paths[&format!("{base}/{}", k.plural)]["get"].is_object());
        }
        // the kind's schema is krvirt-api's (with its own properties), not a
        // placeholder; kinds with a spec show it (Event and the RBAC kinds,
        // like Kubernetes', have none: rules, subjects and roleRef instead)
        let schema = &schemas[k.schema_name];
        assert!(schema.is_object(), "schema {} missing", k.schema_name);
        assert!(schema.to_string().contains("metadata"), "{}", k.schema_name);
        let no_spec = [
            "Event",
            "Role",
            "ClusterRole",
            "RoleBinding",
            "ClusterRoleBinding",
        ];
        if !no_spec.contains(&k.kind) {
            assert!(schema.to_string().contains("spec"), "{}", k.schema_name);
        }
        assert!(schemas.contains_key(&format!("{}List", k.schema_name)));
        for sub in krvirt_server::implemented_subresources(k) {
            let p = format!(
                "/apis/subresources.{}/{}/namespaces/{{namespace}}/{}/{{name}}/{}",
                k.group, k.version, k.plural, sub.0
            );
            assert!(paths.contains_key(&p), "{p}");
        }
    }
    // every reference resolves
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("odd ref {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    // operation ids are unique
    let mut ids = Vec::new();
    for item in paths.values() {
        for op in item.as_object().unwrap().values() {
            if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                ids.push(id.to_string());
            }
        }
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate operationIds");
}
