//! CRUD semantics over real HTTP.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn crud_lifecycle() {
    let s = TestServer::start().await;
    let created = s
        .create(
            &s.vms("default"),
            &vm_manifest("vm1", json!({"runStrategy": "Halted"})),
        )
        .await;
    let meta = &created["metadata"];
    assert_eq!(meta["name"], "vm1");
    assert_eq!(meta["namespace"], "default");
    assert_eq!(meta["generation"], 1);
    assert!(uuid::Uuid::parse_str(meta["uid"].as_str().unwrap()).is_ok());
    assert!(
        chrono::DateTime::parse_from_rfc3339(meta["creationTimestamp"].as_str().unwrap()).is_ok()
    );
    let rv1: i64 = rv(&created).parse().unwrap();
    assert!(rv1 > 0);
    assert_eq!(created["apiVersion"], "kubevirt.io/v1");
    assert_eq!(created["kind"], "VirtualMachine");

    let (code, got) = s.get(&s.vm("default", "vm1")).await;
    assert_eq!(code, 200);
    assert_eq!(got, created);

    // replace with a spec change: generation bumps, resourceVersion grows
    let mut upd = got.clone();
    upd["spec"]["runStrategy"] = json!("Always");
    let (code, replaced) = s.put(&s.vm("default", "vm1"), &upd).await;
    assert_eq!(code, 200, "{replaced}");
    assert_eq!(replaced["spec"]["runStrategy"], "Always");
    assert_eq!(replaced["metadata"]["generation"], 2);
    assert_eq!(replaced["metadata"]["uid"], created["metadata"]["uid"]);
    assert!(rv(&replaced).parse::<i64>().unwrap() > rv1);

    // metadata-only change: no generation bump
    let mut upd = replaced.clone();
    upd["metadata"]["labels"]["extra"] = json!("yes");
    let (code, relabeled) = s.put(&s.vm("default", "vm1"), &upd).await;
    assert_eq!(code, 200);
    assert_eq!(relabeled["metadata"]["generation"], 2);
    assert_eq!(relabeled["metadata"]["labels"]["extra"], "yes");

    // a no-op replace does not write
    let (code, same) = s.put(&s.vm("default", "vm1"), &relabeled).await;
    assert_eq!(code, 200);
    assert_eq!(rv(&same), rv(&relabeled));

    // list
    s.create(&s.vms("default"), &vm_manifest("vm2", json!({})))
        .await;
    s.create(&s.vms("other"), &vm_manifest("vm3", json!({})))
        .await;
    let (code, list) = s.get(&s.vms("default")).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "VirtualMachineList");
    assert_eq!(list["apiVersion"], "kubevirt.io/v1");
    assert!(
        list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= rv1
    );
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm1", "vm2"]);
    let (_, all) = s.get(&s.url("/apis/kubevirt.io/v1/virtualmachines")).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);

    // delete
    let (code, deleted) = s.delete(&s.vm("default", "vm1")).await;
    assert_eq!(code, 200);
    assert_eq!(deleted["metadata"]["name"], "vm1");
    let (code, st) = s.get(&s.vm("default", "vm1")).await;
    assert_eq!(code, 404);
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "NotFound");
    assert_eq!(st["code"], 404);
    assert_eq!(st["details"]["name"], "vm1");
    assert_eq!(
        st["message"],
        "virtualmachines.kubevirt.io \"vm1\" not found"
    );
    let (code, _) = s.delete(&s.vm("default", "vm1")).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn duplicate_create_is_409_already_exists() {
    let s = TestServer::start().await;
    s.create(&s.vms("default"), &vm_manifest("dup", json!({})))
        .await;
    let (code, st) = s
        .post(&s.vms("default"), &vm_manifest("dup", json!({})))
        .await;
    assert_eq!(code, 409);
    assert_eq!(st["reason"], "AlreadyExists");
    assert_eq!(st["details"]["name"], "dup");
}

#[tokio::test]
async fn stale_resource_version_is_409_conflict() {
    let s = TestServer::start().await;
    let v1 = s
        .create(&s.vms("default"), &vm_manifest("c", json!({})))
        .await;
    let mut a = v1.clone();
    a["spec"]["runStrategy"] = json!("Manual");
    let (code, _) = s.put(&s.vm("default", "c"), &a).await;
    assert_eq!(code, 200);
    // same stale version again
    let mut b = v1.clone();
    b["spec"]["runStrategy"] = json!("Always");
    let (code, st) = s.put(&s.vm("default", "c"), &b).await;
    assert_eq!(code, 409, "{st}");
    assert_eq!(st["reason"], "Conflict");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified")
    );
    // without resourceVersion: last writer wins
    b["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, v) = s.put(&s.vm("default", "c"), &b).await;
    assert_eq!(code, 200);
    assert_eq!(v["spec"]["runStrategy"], "Always");
    // merge patch with a stale resourceVersion precondition
    let (code, st) = s
        .merge_patch(
            &s.vm("default", "c"),
            &json!({"metadata": {"resourceVersion": rv(&v1)}, "spec": {"runStrategy": "Halted"}}),
        )
        .await;
    assert_eq!(code, 409);
    assert_eq!(st["reason"], "Conflict");
    // delete with a stale precondition
    let r = s
        .client
        .delete(s.vm("default", "c"))
        .json(&json!({"preconditions": {"resourceVersion": rv(&v1)}}))
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 409);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("Precondition failed")
    );
    let r = s
        .client
        .delete(s.vm("default", "c"))
        .json(&json!({"preconditions": {"uid": "not-the-uid"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let r = s
        .client
        .delete(s.vm("default", "c"))
        .json(&json!({"preconditions": {"uid": v1["metadata"]["uid"], "resourceVersion": rv(&v)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn invalid_objects_are_422_with_causes() {
    let s = TestServer::start().await;
    let mut bad = vm_manifest("bad", json!({"runStrategy": "Sometimes"}));
    bad["spec"].as_object_mut().unwrap().remove("template");
    bad["bogus"] = json!(1);
    let (code, st) = s.post(&s.vms("default"), &bad).await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(st["reason"], "Invalid");
    assert_eq!(st["details"]["kind"], "VirtualMachine");
    assert_eq!(st["details"]["group"], "kubevirt.io");
    assert_eq!(st["details"]["name"], "bad");
    let fields: Vec<&str> = st["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"spec.template"), "{fields:?}");
    assert!(fields.contains(&"spec.runStrategy"), "{fields:?}");
    assert!(fields.contains(&"bogus"), "{fields:?}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .starts_with("VirtualMachine.kubevirt.io \"bad\" is invalid: [")
    );

    // invalid on update, with old object available to admission
    let vmi = s.create(&s.vmis("default"), &vmi_manifest("i1")).await;
    let mut upd = vmi.clone();
    upd["spec"]["domain"]["cpu"] = json!({"cores": 2});
    let (code, st) = s.put(&s.vmi("default", "i1"), &upd).await;
    assert_eq!(code, 422);
    assert_eq!(st["details"]["causes"][0]["field"], "spec.domain");

    // bad names
    let (code, st) = s
        .post(&s.vms("default"), &vm_manifest("Not_A_Name", json!({})))
        .await;
    assert_eq!(code, 422);
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name");
    let mut noname = vm_manifest("x", json!({}));
    noname["metadata"].as_object_mut().unwrap().remove("name");
    let (code, st) = s.post(&s.vms("default"), &noname).await;
    assert_eq!(code, 422);
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.name");
}

#[tokio::test]
async fn bad_requests() {
    let s = TestServer::start().await;
    // malformed JSON
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 400);
    assert_eq!(st["reason"], "BadRequest");
    // wrong kind
    let mut o = vm_manifest("k", json!({}));
    o["kind"] = json!("VirtualMachineInstance");
    assert_eq!(s.post(&s.vms("default"), &o).await.0, 400);
    // namespace mismatch
    let mut o = vm_manifest("k", json!({}));
    o["metadata"]["namespace"] = json!("elsewhere");
    let (code, st) = s.post(&s.vms("default"), &o).await;
    assert_eq!(code, 400);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("does not match the namespace")
    );
    // name mismatch on PUT
    let v = s
        .create(&s.vms("default"), &vm_manifest("k", json!({})))
        .await;
    assert_eq!(s.put(&s.vm("default", "other"), &v).await.0, 400);
    // bad selectors name the selector
    let (code, st) = s
        .get(&format!("{}?labelSelector=a%20in%20x", s.vms("default")))
        .await;
    assert_eq!(code, 400);
    assert!(
        st["message"].as_str().unwrap().contains("\"a in x\""),
        "{st}"
    );
    let (code, st) = s
        .get(&format!("{}?fieldSelector=spec.x%3Dy", s.vms("default")))
        .await;
    assert_eq!(code, 400);
    assert!(st["message"].as_str().unwrap().contains("spec.x"), "{st}");
    // unsupported media types
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 415);
    assert_eq!(st["reason"], "UnsupportedMediaType");
    let r = s
        .client
        .patch(s.vm("default", "k"))
        .header("Content-Type", "application/strategic-merge-patch+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    // too large
    let big = "x".repeat(krvirt_server::MAX_BODY_BYTES + 1);
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "application/json")
        .body(format!("\"{big}\""))
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 413);
    assert_eq!(st["reason"], "RequestEntityTooLarge");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_status_objects() {
    let s = TestServer::start().await;
    for path in [
        "/nope",
        "/apis/kubevirt.io/v1/namespaces/default/gadgets",
        "/apis/unknown.io/v1",
        "/apis/kubevirt.io/v1/namespaces/default/virtualmachines/x/y/z",
    ] {
        let (code, st) = s.get(&s.url(path)).await;
        assert_eq!(code, 404, "{path}");
        assert_eq!(st["kind"], "Status", "{path}");
        assert_eq!(st["reason"], "NotFound");
    }
    let r = s.client.delete(s.vms("default")).send().await.unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 405);
    assert_eq!(st["reason"], "MethodNotAllowed");
    let r = s
        .client
        .post(s.url("/apis/kubevirt.io/v1/virtualmachines"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = s
        .client
        .post(s.vm("default", "x"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = s
        .client
        .get(s.sub("virtualmachines", "default", "x", "start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
}

#[tokio::test]
async fn yaml_in_and_out() {
    let s = TestServer::start().await;
    let yaml = "apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: fromyaml
  labels:
    app: demo
spec:
  runStrategy: Manual
  template:
    spec:
      domain:
        devices: {}
        resources:
          requests:
            memory: 64Mi
";
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    let (code, v) = status_json(r).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["spec"]["runStrategy"], "Manual");
    assert_eq!(
        v["spec"]["template"]["spec"]["domain"]["resources"]["requests"]["memory"],
        "64Mi"
    );

    let r = s
        .client
        .get(s.vm("default", "fromyaml"))
        .header("Accept", "application/yaml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    let text = r.text().await.unwrap();
    assert!(text.contains("runStrategy: Manual"), "{text}");
    let back: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(back, v);

    // errors in YAML too
    let r = s
        .client
        .get(s.vm("default", "missing"))
        .header("Accept", "application/yaml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let st: Value = serde_saphyr::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(st["reason"], "NotFound");

    // YAML list
    let r = s
        .client
        .get(s.vms("default"))
        .header("Accept", "application/yaml")
        .send()
        .await
        .unwrap();
    let list: Value = serde_saphyr::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(list["kind"], "VirtualMachineList");

    // YAML replace
    let upd = text.replace("runStrategy: Manual", "runStrategy: Always");
    let r = s
        .client
        .put(s.vm("default", "fromyaml"))
        .header("Content-Type", "application/yaml")
        .body(upd)
        .send()
        .await
        .unwrap();
    let (code, v) = status_json(r).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["spec"]["runStrategy"], "Always");

    // broken YAML
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "application/yaml")
        .body("a: [unclosed")
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 400);
    assert!(st["message"].as_str().unwrap().contains("YAML"));
}

#[tokio::test]
async fn merge_patch_main_and_status() {
    let s = TestServer::start().await;
    s.create(
        &s.vms("default"),
        &vm_manifest("p", json!({"runStrategy": "Halted"})),
    )
    .await;
    let (code, v) = s
        .merge_patch(&s.vm("default", "p"), &json!({"metadata": {"labels": {"app": null, "new": "1"}}, "spec": {"runStrategy": "Always"}, "status": {"ready": true}}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["spec"]["runStrategy"], "Always");
    assert_eq!(v["metadata"]["labels"], json!({"new": "1"}));
    assert_eq!(v["metadata"]["generation"], 2);
    assert!(
        v.get("status").is_none(),
        "main patch must ignore status: {v}"
    );

    let (code, v) = s
        .merge_patch(
            &format!("{}/status", s.vm("default", "p")),
            &json!({"status": {"printableStatus": "Running"}, "spec": {"runStrategy": "Halted"}}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"]["printableStatus"], "Running");
    assert_eq!(
        v["spec"]["runStrategy"], "Always",
        "status patch must ignore spec"
    );
    assert_eq!(v["metadata"]["generation"], 2);

    let (code, v) = s
        .merge_patch(
            &s.vm("default", "p"),
            &json!({"spec": {"runStrategy": "Sometimes"}}),
        )
        .await;
    assert_eq!(code, 422, "{v}");
    let (code, _) = s
        .merge_patch(&s.vm("default", "nope"), &json!({"spec": {}}))
        .await;
    assert_eq!(code, 404);
    let (code, _) = s.merge_patch(&s.vm("default", "p"), &json!([1])).await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn status_subresource_and_main_put_are_separate() {
    let s = TestServer::start().await;
    // status in a create is dropped
    let mut m = vm_manifest("st", json!({"runStrategy": "Halted"}));
    m["status"] = json!({"printableStatus": "Bogus"});
    let v = s.create(&s.vms("default"), &m).await;
    assert!(v.get("status").is_none());

    // PUT /status changes status only
    let mut upd = v.clone();
    upd["status"] = json!({"printableStatus": "Stopped", "ready": false});
    upd["spec"]["runStrategy"] = json!("Always");
    upd["metadata"]["labels"] = json!({"changed": "yes"});
    let (code, after) = s
        .put(&format!("{}/status", s.vm("default", "st")), &upd)
        .await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["status"]["printableStatus"], "Stopped");
    assert_eq!(after["spec"]["runStrategy"], "Halted");
    assert_eq!(after["metadata"]["labels"], json!({"app": "test"}));
    assert_eq!(after["metadata"]["generation"], 1);

    // GET /status
    let (code, got) = s.get(&format!("{}/status", s.vm("default", "st"))).await;
    assert_eq!(code, 200);
    assert_eq!(got["status"]["printableStatus"], "Stopped");

    // main PUT ignores status changes
    let mut upd = after.clone();
    upd["status"] = json!({"printableStatus": "Hacked"});
    upd["spec"]["runStrategy"] = json!("Always");
    let (code, main) = s.put(&s.vm("default", "st"), &upd).await;
    assert_eq!(code, 200);
    assert_eq!(main["status"]["printableStatus"], "Stopped");
    assert_eq!(main["spec"]["runStrategy"], "Always");
    assert_eq!(main["metadata"]["generation"], 2);

    // status PUT with a stale version conflicts
    let (code, _) = s
        .put(&format!("{}/status", s.vm("default", "st")), &after)
        .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn finalizers_delay_deletion() {
    let s = TestServer::start().await;
    let mut m = vm_manifest("fin", json!({}));
    m["metadata"]["finalizers"] = json!(["a.krvirt.io/x", "b.krvirt.io/y"]);
    s.create(&s.vms("default"), &m).await;

    let (code, marked) = s.delete(&s.vm("default", "fin")).await;
    assert_eq!(code, 202, "{marked}");
    let ts = marked["metadata"]["deletionTimestamp"]
        .as_str()
        .expect("deletionTimestamp");
    assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok());
    // still readable; a second delete changes nothing
    let (code, got) = s.get(&s.vm("default", "fin")).await;
    assert_eq!(code, 200);
    assert_eq!(got["metadata"]["deletionTimestamp"], ts);
    let (code, again) = s.delete(&s.vm("default", "fin")).await;
    assert_eq!(code, 202);
    assert_eq!(rv(&again), rv(&got));

    // no new finalizers while being deleted
    let (code, st) = s
        .merge_patch(&s.vm("default", "fin"), &json!({"metadata": {"finalizers": ["a.krvirt.io/x", "b.krvirt.io/y", "c.krvirt.io/z"]}}))
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(st["details"]["causes"][0]["field"], "metadata.finalizers");
    // deletionTimestamp cannot be cleared by an update
    let mut upd = got.clone();
    upd["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("deletionTimestamp");
    upd["metadata"]["finalizers"] = json!(["b.krvirt.io/y"]);
    let (code, v) = s.put(&s.vm("default", "fin"), &upd).await;
    assert_eq!(code, 200);
    assert_eq!(v["metadata"]["deletionTimestamp"], ts);
    assert_eq!(v["metadata"]["finalizers"], json!(["b.krvirt.io/y"]));

    // removing the last finalizer removes the object
    let (code, v) = s
        .merge_patch(
            &s.vm("default", "fin"),
            &json!({"metadata": {"finalizers": null}}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = s.get(&s.vm("default", "fin")).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn generate_name_and_cluster_scoped_kinds() {
    let s = TestServer::start().await;
    let mut m = vm_manifest("x", json!({}));
    m["metadata"] = json!({"generateName": "gen-"});
    let a = s.create(&s.vms("default"), &m).await;
    let b = s.create(&s.vms("default"), &m).await;
    let (na, nb) = (
        a["metadata"]["name"].as_str().unwrap(),
        b["metadata"]["name"].as_str().unwrap(),
    );
    assert!(na.starts_with("gen-") && na.len() == 9, "{na}");
    assert_ne!(na, nb);

    // cluster-scoped: no namespace in URL or object; admission defaults kept
    let hosts = s.url("/apis/krvirt.io/v1/hosts");
    let h = s.create(&hosts, &json!({"apiVersion": "krvirt.io/v1", "kind": "Host", "metadata": {"name": "h1", "namespace": "ignored"}, "spec": {}})).await;
    assert!(h["metadata"].get("namespace").is_none());
    assert_eq!(h["spec"]["unschedulable"], false);
    let (code, got) = s.get(&format!("{hosts}/h1")).await;
    assert_eq!(code, 200);
    assert_eq!(got, h);
    let (code, list) = s.get(&hosts).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "HostList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (code, v) = s
        .merge_patch(
            &format!("{hosts}/h1/status"),
            &json!({"status": {"phase": "Ready"}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["status"]["phase"], "Ready");
    let (code, _) = s.delete(&format!("{hosts}/h1")).await;
    assert_eq!(code, 200);
    // namespaced route for a cluster-scoped kind does not exist
    let (code, _) = s
        .get(&s.url("/apis/krvirt.io/v1/namespaces/default/hosts"))
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn list_with_label_and_field_selectors() {
    let s = TestServer::start().await;
    for (name, app, tier) in [("a", "web", "1"), ("b", "web", "2"), ("c", "db", "1")] {
        let mut m = vm_manifest(name, json!({}));
        m["metadata"]["labels"] = json!({"app": app, "tier": tier});
        s.create(&s.vms("default"), &m).await;
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let q = |sel: &str| format!("{}?labelSelector={}", s.vms("default"), urlencode(sel));
    assert_eq!(names(&s.get(&q("app=web")).await.1), ["a", "b"]);
    assert_eq!(names(&s.get(&q("app!=web")).await.1), ["c"]);
    assert_eq!(
        names(&s.get(&q("app in (db,web),tier=1")).await.1),
        ["a", "c"]
    );
    assert_eq!(names(&s.get(&q("tier notin (1)")).await.1), ["b"]);
    assert_eq!(names(&s.get(&q("!app")).await.1), Vec::<String>::new());
    let f = format!("{}?fieldSelector=metadata.name%3Db", s.vms("default"));
    assert_eq!(names(&s.get(&f).await.1), ["b"]);
    let f = format!(
        "{}?fieldSelector=metadata.namespace%3Ddefault,metadata.name!%3Db",
        s.url("/apis/kubevirt.io/v1/virtualmachines")
    );
    assert_eq!(names(&s.get(&f).await.1), ["a", "c"]);

    // status.nodeName on VMIs (what the agent watches)
    for (n, node) in [("i1", "h1"), ("i2", "h2")] {
        s.create(&s.vmis("default"), &vmi_manifest(n)).await;
        let (code, _) = s
            .merge_patch(
                &format!("{}/status", s.vmi("default", n)),
                &json!({"status": {"nodeName": node, "phase": "Running"}}),
            )
            .await;
        assert_eq!(code, 200);
    }
    let f = format!(
        "{}?fieldSelector=status.nodeName%3Dh2",
        s.url("/apis/kubevirt.io/v1/virtualmachineinstances")
    );
    assert_eq!(names(&s.get(&f).await.1), ["i2"]);
    let f = format!("{}?fieldSelector=status.phase%3DRunning", s.vmis("default"));
    assert_eq!(names(&s.get(&f).await.1), ["i1", "i2"]);
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test]
async fn real_kinds_smoke() {
    // A KubeVirt example manifest through the real krvirt-api admission.
    let s = TestServer::real().await;
    let yaml = "apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: vm-cirros
  name: vm-cirros
spec:
  runStrategy: Halted
  template:
    metadata:
      labels:
        kubevirt.io/vm: vm-cirros
    spec:
      domain:
        devices:
          disks:
          - disk:
              bus: virtio
            name: containerdisk
        memory:
          guest: 128Mi
        resources: {}
      terminationGracePeriodSeconds: 0
      volumes:
      - containerDisk:
          image: registry:5000/kubevirt/cirros-container-disk-demo:devel
        name: containerdisk
";
    let r = s
        .client
        .post(s.vms("default"))
        .header("Content-Type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    let (code, vm) = status_json(r).await;
    assert_eq!(code, 201, "{vm}");
    assert_eq!(vm["metadata"]["generation"], 1);
    // defaults applied by admission are stored
    assert!(
        vm["spec"]["template"]["spec"]["domain"]["machine"].is_object(),
        "{vm}"
    );

    // unknown and not-implemented fields are refused by path
    let bad = yaml.replace(
        "        resources: {}\n",
        "        resources: {}\n        gpus: []\n        bogus: 1\n",
    );
    let r = s
        .client
        .post(s.vms("other"))
        .header("Content-Type", "application/yaml")
        .body(bad)
        .send()
        .await
        .unwrap();
    let (code, st) = status_json(r).await;
    assert_eq!(code, 422, "{st}");
    let fields: Vec<&str> = st["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"spec.template.spec.domain.bogus"),
        "{fields:?}"
    );

    // a spec change bumps generation; a label change does not
    let (code, v) = s
        .merge_patch(
            &s.vm("default", "vm-cirros"),
            &json!({"spec": {"runStrategy": "Manual"}}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["generation"], 2);
    let (code, v) = s
        .merge_patch(
            &s.vm("default", "vm-cirros"),
            &json!({"metadata": {"labels": {"x": "y"}}}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["metadata"]["generation"], 2);
    // status through the status subresource, validated by the typed status
    let (code, v) = s
        .merge_patch(
            &format!("{}/status", s.vm("default", "vm-cirros")),
            &json!({"status": {"printableStatus": "Stopped", "ready": false}}),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"]["printableStatus"], "Stopped");
    let (code, st) = s
        .merge_patch(
            &format!("{}/status", s.vm("default", "vm-cirros")),
            &json!({"status": {"printableStatus": "Dancing"}}),
        )
        .await;
    assert_eq!(code, 422, "{st}");
    // a VMI's spec is immutable
    let vmi = s.create(&s.vmis("default"), &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "i"}, "spec": vm["spec"]["template"]["spec"].clone()})).await;
    let (code, st) = s
        .merge_patch(
            &s.vmi("default", "i"),
            &json!({"spec": {"terminationGracePeriodSeconds": 1}}),
        )
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(vmi["metadata"]["generation"], 1);
}
