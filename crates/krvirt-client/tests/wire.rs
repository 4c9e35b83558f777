//! The client's wire handling against a small axum server (tests/common).

mod common;

use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use krvirt_api::KindInfo;
use krvirt_client::{
    Client, ClientError, ListParams, PatchTarget, ResumeOptions, ServerOrigin, StartOptions,
    WatchEvent, WatchEventKind,
};
use serde_json::{Value, json};

const VM: KindInfo = KindInfo {
    group: "kubevirt.io",
    version: "v1",
    kind: "VirtualMachine",
    plural: "virtualmachines",
    singular: "virtualmachine",
    short_names: &["vm", "vms"],
    namespaced: true,
    subresources: &["start", "stop", "restart"],
    schema_name: "VirtualMachine",
};

const HOST: KindInfo = KindInfo {
    group: "krvirt.io",
    version: "v1",
    kind: "Host",
    plural: "hosts",
    singular: "host",
    short_names: &[],
    namespaced: false,
    subresources: &[],
    schema_name: "Host",
};

const STEP: Duration = Duration::from_secs(10);

fn vm(name: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": "demo", "note": "naïve-ü"}},
        "spec": {"runStrategy": "Halted"},
    })
}

async fn next(s: &mut krvirt_client::WatchStream) -> WatchEvent {
    match tokio::time::timeout(STEP, s.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch yielded an error: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {STEP:?}"),
    }
}

fn summary(ev: &WatchEvent) -> (WatchEventKind, String, String) {
    (
        ev.kind,
        ev.object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        ev.resource_version().unwrap_or("").to_string(),
    )
}

fn ev(kind: WatchEventKind, name: &str, rv: u64) -> (WatchEventKind, String, String) {
    (kind, name.to_string(), rv.to_string())
}

#[tokio::test]
async fn crud_round_trip_uses_kubernetes_paths_and_media_types() {
    let srv = TestServer::start().await;
    let c = Client::new(&srv.url).expect("client");
    assert_eq!(c.base_url(), srv.url);

    let created = c.create(&VM, "default", &vm("vm1")).await.expect("create");
    assert_eq!(created["metadata"]["resourceVersion"], "1");
    let got = c.get(&VM, "default", "vm1").await.expect("get");
    assert_eq!(got["metadata"]["labels"]["note"], "naïve-ü");

    #[derive(serde::Deserialize)]
    struct Meta {
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Typed {
        metadata: Meta,
    }
    let typed: Typed = c.get_as(&VM, "default", "vm1").await.expect("get_as");
    assert_eq!(typed.metadata.name, "vm1");

    let mut next_obj = got.clone();
    next_obj["spec"]["runStrategy"] = json!("Always");
    let replaced = c
        .replace(&VM, "default", "vm1", &next_obj)
        .await
        .expect("replace");
    assert_eq!(replaced["spec"]["runStrategy"], "Always");
    assert_eq!(replaced["metadata"]["resourceVersion"], "2");

    let patched = c
        .merge_patch(
            &VM,
            "default",
            "vm1",
            &json!({"metadata": {"labels": {"note": null}}}),
            PatchTarget::Main,
        )
        .await
        .expect("patch");
    assert!(patched["metadata"]["labels"].get("note").is_none());
    let patched = c
        .merge_patch(
            &VM,
            "default",
            "vm1",
            &json!({"status": {"printableStatus": "Running"}}),
            PatchTarget::Status,
        )
        .await
        .expect("status patch");
    assert_eq!(patched["status"]["printableStatus"], "Running");
    let st = c
        .replace_status(
            &VM,
            "default",
            "vm1",
            &json!({"status": {"printableStatus": "Stopped"}}),
        )
        .await
        .expect("replace status");
    assert_eq!(st["status"]["printableStatus"], "Stopped");

    c.create(&VM, "other", &vm("vm2"))
        .await
        .expect("create vm2");
    let all = c
        .list(&VM, &ListParams::all_namespaces())
        .await
        .expect("list all");
    assert_eq!(all.items.len(), 2);
    assert_eq!(all.resource_version, "6");
    let one_ns = c
        .list(&VM, &ListParams::namespaced("other"))
        .await
        .expect("list ns");
    assert_eq!(one_ns.items.len(), 1);
    let by_label = c
        .list(
            &VM,
            &ListParams::all_namespaces().labels("app=demo").named("vm2"),
        )
        .await
        .expect("list selected");
    assert_eq!(by_label.items.len(), 1);
    assert_eq!(by_label.items[0]["metadata"]["name"], "vm2");

    let deleted = c.delete(&VM, "default", "vm1").await.expect("delete");
    assert_eq!(deleted["metadata"]["name"], "vm1");

    c.create(&HOST, "ignored", &json!({"metadata": {"name": "h1"}}))
        .await
        .expect_err("the test server refuses cluster-scoped creates");
    let reqs = srv.state.requests();
    let seen: Vec<(String, String, String, String)> = reqs
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.path.clone(),
                r.query.clone(),
                r.content_type.clone(),
            )
        })
        .collect();
    let s = |m: &str, p: &str, q: &str, ct: &str| {
        (m.to_string(), p.to_string(), q.to_string(), ct.to_string())
    };
    let base = "/apis/kubevirt.io/v1";
    assert_eq!(
        seen,
        vec![
            s(
                "POST",
                &format!("{base}/namespaces/default/virtualmachines"),
                "",
                "application/json"
            ),
            s(
                "GET",
                &format!("{base}/namespaces/default/virtualmachines/vm1"),
                "",
                ""
            ),
            s(
                "GET",
                &format!("{base}/namespaces/default/virtualmachines/vm1"),
                "",
                ""
            ),
            s(
                "PUT",
                &format!("{base}/namespaces/default/virtualmachines/vm1"),
                "",
                "application/json"
            ),
            s(
                "PATCH",
                &format!("{base}/namespaces/default/virtualmachines/vm1"),
                "",
                "application/merge-patch+json"
            ),
            s(
                "PATCH",
                &format!("{base}/namespaces/default/virtualmachines/vm1/status"),
                "",
                "application/merge-patch+json"
            ),
            s(
                "PUT",
                &format!("{base}/namespaces/default/virtualmachines/vm1/status"),
                "",
                "application/json"
            ),
            s(
                "POST",
                &format!("{base}/namespaces/other/virtualmachines"),
                "",
                "application/json"
            ),
            s("GET", &format!("{base}/virtualmachines"), "", ""),
            s(
                "GET",
                &format!("{base}/namespaces/other/virtualmachines"),
                "",
                ""
            ),
            s(
                "GET",
                &format!("{base}/virtualmachines"),
                "labelSelector=app%3Ddemo&fieldSelector=metadata.name%3Dvm2",
                ""
            ),
            s(
                "DELETE",
                &format!("{base}/namespaces/default/virtualmachines/vm1"),
                "",
                ""
            ),
            s("POST", "/apis/krvirt.io/v1/hosts", "", "application/json"),
        ]
    );
}

#[tokio::test]
async fn cluster_scoped_urls_have_no_namespace() {
    let srv = TestServer::start().await;
    srv.state
        .put("hosts", "", "h1", json!({"kind": "Host"}), true);
    let c = Client::new(&srv.url).expect("client");
    let h = c.get(&HOST, "default", "h1").await.expect("get host");
    assert_eq!(h["metadata"]["name"], "h1");
    let list = c
        .list(&HOST, &ListParams::namespaced("default"))
        .await
        .expect("list hosts");
    assert_eq!(list.items.len(), 1);
    let paths: Vec<String> = srv
        .state
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        vec!["/apis/krvirt.io/v1/hosts/h1", "/apis/krvirt.io/v1/hosts"]
    );
}

#[tokio::test]
async fn server_status_is_decoded_with_reason_code_and_field_causes() {
    let srv = TestServer::start().await;
    let c = Client::new(&srv.url).expect("client");

    let mut bad = vm("Bad_Name");
    bad["spec"]["bogus"] = json!(1);
    let e = c
        .create(&VM, "default", &bad)
        .await
        .expect_err("invalid object");
    assert!(e.is_invalid(), "{e:?}");
    let st = e.status().expect("status");
    assert_eq!(st.code, 422);
    assert_eq!(st.reason, "Invalid");
    assert_eq!(
        e.to_string(),
        "VirtualMachine.kubevirt.io \"Bad_Name\" is invalid"
    );
    let causes: Vec<(&str, &str)> = st
        .causes()
        .iter()
        .map(|c| (c.field.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        causes,
        vec![
            ("metadata.name", "FieldValueInvalid"),
            ("spec.bogus", "FieldUnknown")
        ]
    );
    assert_eq!(st.causes()[1].message, "unknown field \"bogus\"");

    let e = c.get(&VM, "default", "nope").await.expect_err("missing");
    assert!(e.is_not_found() && !e.is_conflict());
    assert_eq!(e.code(), Some(404));
    assert_eq!(
        e.to_string(),
        "virtualmachines.kubevirt.io \"nope\" not found"
    );

    c.create(&VM, "default", &vm("dup")).await.expect("create");
    let e = c
        .create(&VM, "default", &vm("dup"))
        .await
        .expect_err("duplicate");
    assert!(e.is_already_exists() && !e.is_conflict(), "{e:?}");

    let mut stale = c.get(&VM, "default", "dup").await.expect("get");
    stale["metadata"]["resourceVersion"] = json!("999");
    let e = c
        .replace(&VM, "default", "dup", &stale)
        .await
        .expect_err("stale");
    assert!(e.is_conflict() && !e.is_already_exists(), "{e:?}");
    assert_eq!(e.code(), Some(409));
}

#[tokio::test]
async fn error_bodies_that_are_not_status_are_synthesized() {
    let srv = TestServer::start().await;
    let c = Client::new(&format!("{}/", srv.url)).expect("client");

    // Plain-text 500: the text becomes the message.
    let e = c.get(&VM, "default", "explode").await.expect_err("500");
    let st = e.status().expect("synthesized status");
    assert_eq!((st.code, st.reason.as_str()), (500, "InternalError"));
    assert_eq!(
        e.to_string(),
        "the server responded 500 InternalError: boom: the disk is on fire"
    );

    // A path the server does not route: empty-body 404.
    let weird = KindInfo {
        group: "",
        version: "v1",
        plural: "../x",
        ..HOST
    };
    let e = c.get(&weird, "", "a").await.expect_err("404");
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.to_string(), "the server responded 404 NotFound");
    // Path-like plurals are escaped, never interpreted as navigation.
    let path = srv
        .state
        .requests()
        .last()
        .map(|r| r.path.clone())
        .unwrap_or_default();
    assert_eq!(path, "/api/v1/..%2Fx/a");

    let v = c.server_version().await.expect("version");
    assert_eq!(v["gitVersion"], "v9.9.9-test");
}

#[tokio::test]
async fn synthesized_status_messages() {
    let s = krvirt_client::Status::synthesize(500, "boom: the disk is on fire\n");
    assert_eq!(
        s.message,
        "the server responded 500 InternalError: boom: the disk is on fire"
    );
    assert_eq!(s.reason, "InternalError");
    let s = krvirt_client::Status::synthesize(404, "");
    assert_eq!(s.message, "the server responded 404 NotFound");
}

#[tokio::test]
async fn connection_refused_names_the_server_and_how_to_choose_another() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let c = Client::from_env(Some(format!("http://{addr}"))).expect("client");
    assert_eq!(c.origin(), ServerOrigin::Flag);
    let e = c.get(&VM, "default", "x").await.expect_err("refused");
    assert!(e.is_unreachable(), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach the krvirt server at http://{addr} (from --server): connection refused. \
             Is `krvirt up` running? Choose another server with --server URL or the KRVIRT_SERVER \
             environment variable"
        )
    );
    // The console and watches report it the same way.
    let e = c
        .console("default", "x")
        .await
        .err()
        .expect("console refused");
    assert!(e.is_unreachable(), "{e:?}");
    let e = c
        .watch(&VM, &ListParams::all_namespaces())
        .await
        .err()
        .expect("watch refused");
    assert!(e.is_unreachable(), "{e:?}");
}

#[test]
fn server_address_precedence_and_validation() {
    use krvirt_client::{DEFAULT_SERVER, resolve_server};
    assert_eq!(
        resolve_server(Some("http://a:1".into()), Some("http://b:2".into())),
        ("http://a:1".to_string(), ServerOrigin::Flag)
    );
    assert_eq!(
        resolve_server(None, Some("http://b:2".into())),
        ("http://b:2".to_string(), ServerOrigin::Env)
    );
    assert_eq!(
        resolve_server(Some(" ".into()), Some(String::new())),
        (DEFAULT_SERVER.to_string(), ServerOrigin::Default)
    );
    assert_eq!(DEFAULT_SERVER, "http://127.0.0.1:8440");
    assert_eq!(
        Client::new("10.0.0.1:8440").expect("no scheme").base_url(),
        "http://10.0.0.1:8440"
    );
    for bad in ["ftp://x", "http://", "http://a:1/?q=1", "::::"] {
        let e = Client::new(bad).expect_err(bad);
        assert!(
            matches!(e, ClientError::InvalidServer { .. }),
            "{bad}: {e:?}"
        );
    }
    let c = Client::new("http://a:1").expect("client");
    let e = futures::executor::block_on(c.get(&VM, "default", "a/b")).expect_err("slash in name");
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");
    let e = futures::executor::block_on(c.get(&VM, "", "a")).expect_err("no namespace");
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");
}

#[tokio::test]
async fn watch_decodes_events_split_across_chunks() {
    let srv = TestServer::start().await;
    srv.state.lock().chunk = 7; // every line arrives in 7-byte pieces (splitting "ï" too)
    let c = Client::new(&srv.url).expect("client");
    c.create(&VM, "default", &vm("a")).await.expect("create");
    let mut w = c
        .watch(&VM, &ListParams::namespaced("default").at("0"))
        .await
        .expect("watch");
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "a", 1)
    );
    let mut obj = c.get(&VM, "default", "a").await.expect("get");
    obj["spec"]["runStrategy"] = json!("Always");
    c.replace(&VM, "default", "a", &obj).await.expect("replace");
    let e = next(&mut w).await;
    assert_eq!(summary(&e), ev(WatchEventKind::Modified, "a", 2));
    assert_eq!(e.object["metadata"]["labels"]["note"], "naïve-ü");
    c.delete(&VM, "default", "a").await.expect("delete");
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Deleted, "a", 3)
    );
    assert_eq!(
        srv.state.watch_queries(),
        vec!["watch=true&resourceVersion=0".to_string()]
    );
}

#[tokio::test]
async fn raw_watch_reports_a_dropped_connection_as_an_error() {
    let srv = TestServer::start().await;
    {
        let mut st = srv.state.lock();
        st.drop_after = Some(1);
        st.abrupt = true;
    }
    let c = Client::new(&srv.url).expect("client");
    c.create(&VM, "default", &vm("a")).await.expect("create");
    let mut w = c
        .watch(&VM, &ListParams::all_namespaces().at("0"))
        .await
        .expect("watch");
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "a", 1)
    );
    match tokio::time::timeout(STEP, w.next()).await.expect("in time") {
        Some(Err(ClientError::Transport { .. })) => {}
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(STEP, w.next())
            .await
            .expect("in time")
            .is_none()
    );
}

async fn resumes_after_dropped_connections(abrupt: bool) {
    let srv = TestServer::start().await;
    {
        let mut st = srv.state.lock();
        st.drop_after = Some(1);
        st.abrupt = abrupt;
        st.chunk = 5;
    }
    let c = Client::new(&srv.url).expect("client");
    c.create(&VM, "default", &vm("a")).await.expect("create a");
    c.create(&VM, "default", &vm("b")).await.expect("create b");
    let mut w = c.watch_resumable(
        &VM,
        &ListParams::namespaced("default"),
        ResumeOptions::default(),
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "a", 1)
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "b", 2)
    );

    // Each watch connection carries one event and then breaks.
    let mut obj = c.get(&VM, "default", "a").await.expect("get");
    obj["spec"]["runStrategy"] = json!("Always");
    c.replace(&VM, "default", "a", &obj)
        .await
        .expect("modify a"); // rv 3
    c.create(&VM, "default", &vm("c")).await.expect("create c"); // rv 4
    c.delete(&VM, "default", "b").await.expect("delete b"); // rv 5
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Modified, "a", 3)
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "c", 4)
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Deleted, "b", 5)
    );

    let queries = srv.state.watch_queries();
    // (The stream is lazy: the reconnect after the last event waits for
    // the next poll.)
    assert_eq!(
        queries,
        vec![
            "watch=true&resourceVersion=2".to_string(),
            "watch=true&resourceVersion=3".to_string(),
            "watch=true&resourceVersion=4".to_string(),
        ]
    );
    // Nothing was listed again: resuming needed no relist.
    let lists = srv
        .state
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && !r.query.contains("watch=true")
                && r.path.ends_with("/virtualmachines")
        })
        .count();
    assert_eq!(lists, 1);
}

#[tokio::test]
async fn watch_resumable_resumes_after_abrupt_drops() {
    resumes_after_dropped_connections(true).await;
}

#[tokio::test]
async fn watch_resumable_resumes_after_clean_closes() {
    resumes_after_dropped_connections(false).await;
}

async fn relists_on_gone(gone_as_event: bool) {
    let srv = TestServer::start().await;
    srv.state.lock().gone_as_event = gone_as_event;
    let c = Client::new(&srv.url).expect("client");
    c.create(&VM, "default", &vm("a")).await.expect("create a");
    c.create(&VM, "default", &vm("b")).await.expect("create b");
    let mut w = c.watch_resumable(
        &VM,
        &ListParams::namespaced("default"),
        ResumeOptions::default(),
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "a", 1)
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "b", 2)
    );
    let mut obj = c.get(&VM, "default", "a").await.expect("get");
    obj["spec"]["runStrategy"] = json!("Always");
    c.replace(&VM, "default", "a", &obj)
        .await
        .expect("modify a"); // rv 3
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Modified, "a", 3)
    );

    // While the client is cut off, history is compacted and things change.
    srv.state.lock().compacted = 100;
    srv.state.remove("virtualmachines", "default", "b", false); // rv 4
    srv.state
        .put("virtualmachines", "default", "c", vm("c"), false); // rv 5
    let mut a = srv.state.get("virtualmachines", "default", "a").expect("a");
    a["spec"]["runStrategy"] = json!("Halted");
    srv.state.put("virtualmachines", "default", "a", a, false); // rv 6
    srv.state
        .put("virtualmachines", "other", "z", vm("z"), false); // rv 7, other namespace
    srv.state.kill_watches();

    // The resume from 3 gets 410; the relist reports the difference.
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Modified, "a", 6)
    );
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Added, "c", 5)
    );
    let del = next(&mut w).await;
    assert_eq!(summary(&del), ev(WatchEventKind::Deleted, "b", 2));

    // …and the watch carries on from the list's version.
    srv.state.lock().compacted = 0;
    c.delete(&VM, "default", "c").await.expect("delete c"); // rv 8
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Deleted, "c", 8)
    );
    let q = srv.state.watch_queries();
    assert_eq!(
        q.first().map(String::as_str),
        Some("watch=true&resourceVersion=2")
    );
    assert!(
        q.contains(&"watch=true&resourceVersion=3".to_string()),
        "{q:?}"
    );
    assert_eq!(
        q.last().map(String::as_str),
        Some("watch=true&resourceVersion=7")
    );
}

#[tokio::test]
async fn watch_resumable_relists_on_http_410() {
    relists_on_gone(false).await;
}

#[tokio::test]
async fn watch_resumable_relists_on_410_error_event() {
    relists_on_gone(true).await;
}

#[tokio::test]
async fn watch_resumable_without_initial_list_reports_only_changes() {
    let srv = TestServer::start().await;
    let c = Client::new(&srv.url).expect("client");
    c.create(&VM, "default", &vm("a")).await.expect("create");
    let opts = ResumeOptions {
        initial_list: false,
        ..Default::default()
    };
    let mut w = c.watch_resumable(&VM, &ListParams::namespaced("default").named("a"), opts);
    // Give the watch time to open before changing anything.
    let probe = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    assert!(probe.is_err(), "no event expected yet: {probe:?}");
    c.delete(&VM, "default", "a").await.expect("delete");
    assert_eq!(
        summary(&next(&mut w).await),
        ev(WatchEventKind::Deleted, "a", 2)
    );
    assert!(
        srv.state.watch_queries()[0].contains("fieldSelector=metadata.name%3Da"),
        "{:?}",
        srv.state.watch_queries()
    );
}

#[tokio::test]
async fn watch_resumable_gives_up_when_the_server_is_gone() {
    let srv = TestServer::start().await;
    let c = Client::new(&srv.url).expect("client");
    drop(srv);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let opts = ResumeOptions {
        max_consecutive_failures: 3,
        initial_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let mut w = c.watch_resumable(&VM, &ListParams::all_namespaces(), opts);
    match tokio::time::timeout(STEP, w.next()).await.expect("in time") {
        Some(Err(e)) => assert!(e.is_unreachable(), "{e:?}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(STEP, w.next())
            .await
            .expect("in time")
            .is_none()
    );
}

#[tokio::test]
async fn lifecycle_subresources_put_kubevirt_bodies() {
    let srv = TestServer::start().await;
    srv.state
        .put("virtualmachines", "default", "vm1", vm("vm1"), true);
    srv.state
        .put("virtualmachineinstances", "default", "vm1", json!({}), true);
    let c = Client::new(&srv.url).expect("client");
    c.start_vm("default", "vm1", &StartOptions::default())
        .await
        .expect("start");
    c.start_vm("default", "vm1", &StartOptions { paused: true })
        .await
        .expect("start paused");
    c.stop_vm("default", "vm1", Some(30)).await.expect("stop");
    c.stop_vm("default", "vm1", None).await.expect("stop");
    c.restart_vm("default", "vm1", Some(0))
        .await
        .expect("restart");
    c.pause_vmi("default", "vm1").await.expect("pause");
    c.unpause_vmi("default", "vm1").await.expect("unpause");
    c.put_subresource(
        &VM,
        "default",
        "vm1",
        "restart",
        Some(&json!({"dryRun": ["All"]})),
    )
    .await
    .expect("generic");
    let e = c
        .stop_vm("default", "ghost", None)
        .await
        .expect_err("missing vm");
    assert!(e.is_not_found());

    let sub = "/apis/subresources.kubevirt.io/v1/namespaces/default";
    let got: Vec<(String, String, Option<Value>)> = srv
        .state
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.body))
        .collect();
    let vm_path = |a: &str| format!("{sub}/virtualmachines/vm1/{a}");
    let vmi_path = |a: &str| format!("{sub}/virtualmachineinstances/vm1/{a}");
    let put = |p: String, b: Option<Value>| ("PUT".to_string(), p, b);
    assert_eq!(
        got,
        vec![
            put(vm_path("start"), None),
            put(
                vm_path("start"),
                Some(
                    json!({"kind": "StartOptions", "apiVersion": "subresources.kubevirt.io/v1", "paused": true})
                )
            ),
            put(
                vm_path("stop"),
                Some(
                    json!({"kind": "StopOptions", "apiVersion": "subresources.kubevirt.io/v1", "gracePeriod": 30})
                )
            ),
            put(vm_path("stop"), None),
            put(
                vm_path("restart"),
                Some(
                    json!({"kind": "RestartOptions", "apiVersion": "subresources.kubevirt.io/v1", "gracePeriodSeconds": 0})
                )
            ),
            put(vmi_path("pause"), None),
            put(vmi_path("unpause"), None),
            put(vm_path("restart"), Some(json!({"dryRun": ["All"]}))),
            put(format!("{sub}/virtualmachines/ghost/stop"), None),
        ]
    );
}

#[tokio::test]
async fn console_carries_binary_frames_both_ways() {
    let srv = TestServer::start().await;
    srv.state
        .put("virtualmachineinstances", "default", "vm1", json!({}), true);
    let c = Client::new(&srv.url).expect("client");
    let mut con = c.console("default", "vm1").await.expect("console");
    let first = tokio::time::timeout(STEP, con.recv())
        .await
        .expect("in time");
    assert_eq!(first.expect("frame").expect("bytes").as_ref(), b"login: ");
    // Every byte value survives, including ^] and invalid UTF-8.
    let payload: Vec<u8> = (0u8..=255).collect();
    con.send(&payload).await.expect("send");
    let back = tokio::time::timeout(STEP, con.recv())
        .await
        .expect("in time");
    let mut want = b"echo:".to_vec();
    want.extend_from_slice(&payload);
    assert_eq!(
        back.expect("frame").expect("bytes").as_ref(),
        want.as_slice()
    );

    // Split halves work from different tasks; the server's close ends the reader.
    let (mut tx, mut rx) = con.split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(chunk) = rx.next().await {
            got.extend_from_slice(&chunk.expect("chunk"));
        }
        got
    });
    tx.send(b"root\r").await.expect("send");
    tx.send(b"quit").await.expect("send");
    let got = tokio::time::timeout(STEP, reader)
        .await
        .expect("reader ends")
        .expect("join");
    assert_eq!(got, b"echo:root\r".to_vec());
    let mut received = payload.clone();
    received.extend_from_slice(b"root\rquit");
    assert_eq!(srv.state.lock().console_received, received);
}

#[tokio::test]
async fn console_to_a_missing_vmi_reports_not_found() {
    let srv = TestServer::start().await;
    let c = Client::new(&srv.url).expect("client");
    let e = c.console("default", "ghost").await.err().expect("404");
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(
        e.to_string(),
        "virtualmachineinstances.kubevirt.io \"ghost\" not found"
    );
}

#[tokio::test]
async fn console_log_streams_bytes_with_and_without_follow() {
    let srv = TestServer::start().await;
    srv.state
        .put("virtualmachineinstances", "default", "vm1", json!({}), true);
    let c = Client::new(&srv.url).expect("client");
    let collect = |follow: bool| {
        let c = c.clone();
        async move {
            let mut s = c
                .console_log("default", "vm1", follow)
                .await
                .expect("consolelog");
            let mut out = Vec::new();
            while let Some(chunk) = tokio::time::timeout(STEP, s.next()).await.expect("in time") {
                out.extend_from_slice(&chunk.expect("chunk"));
            }
            String::from_utf8(out).expect("utf8")
        }
    };
    assert_eq!(collect(false).await, "boot line 1\r\nboot line 2\r\n");
    assert_eq!(
        collect(true).await,
        "boot line 1\r\nboot line 2\r\nfollowed line 3\r\n"
    );
    let q: Vec<String> = srv
        .state
        .requests()
        .iter()
        .map(|r| r.query.clone())
        .collect();
    assert_eq!(q, vec!["follow=false", "follow=true"]);
    let e = c
        .console_log("default", "ghost", false)
        .await
        .err()
        .expect("404");
    assert!(e.is_not_found());
}
