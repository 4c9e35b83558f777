//! Authentication end to end through the binary: `krvirt server` with its
//! TLS listener and unix socket, `krvirt token`, `krvirt login` (trust on
//! first use), unix socket peer credentials for another uid, and a second
//! process, `krvirt agent`, joining with a one-time token and then using
//! its client certificate.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, kill_processes_under, tail};

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start krvirt");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        kill_processes_under(self.dir.path());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .env_remove("KRVIRT_SERVER")
        .env_remove("KRVIRT_TOKEN")
        .env_remove("KRVIRT_CA")
        .output()
        .expect("run krvirt")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn admin(data: &Path, args: &[&str]) -> Output {
    run(Command::new(BIN).arg("--data-dir").arg(data).args(args))
}

fn until(what: &str, timeout: Duration, log: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            tail(&log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tokens_login_peer_credentials_and_an_agent_joining_with_mtls() {
    let env = Env {
        dir: tempfile::Builder::new()
            .prefix("krvirt-auth-")
            .tempdir()
            .unwrap(),
    };
    let root = env.dir.path();
    // other uids must reach the socket (peer credentials decide)
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = root.join("server");
    let port = free_port();
    let server = Proc::spawn(
        {
            let mut c = Command::new(BIN);
            c.args(["server", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(&data);
            c
        },
        root.join("server.log"),
    );
    let slog = || server.log();
    until("the server socket", Duration::from_secs(30), &slog, || {
        admin(&data, &["get", "ns"]).status.success()
    });
    let https = format!("https://127.0.0.1:{port}");

    // --- tokens and login (trust on first use) ---
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let viewer = ok(
        admin(
            &data,
            &[
                "token", "create", "--user", "vic", "--role", "view", "--ttl", "1h",
            ],
        ),
        "token create",
    )
    .trim()
    .to_string();
    assert!(viewer.starts_with("krv_"), "{viewer}");
    let as_user = |args: &[&str]| {
        run(Command::new(BIN)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .args(args))
    };
    let out = as_user(&["login", "--server", &https, "--token", &viewer]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, "login");
    assert!(stderr.contains("fingerprint"), "{stderr}");
    let cfg = home.join(".config/krvirt/config");
    let mode = std::fs::metadata(&cfg).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // the saved login is used: view reads, cannot create
    ok(as_user(&["get", "vms"]), "get vms with the saved login");
    let vm = root.join("vm.yaml");
    std::fs::write(
        &vm,
        "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: v1}\n\
         spec:\n  runStrategy: Halted\n  template:\n    spec:\n      domain:\n        devices: {}\n        memory: {guest: 64Mi}\n",
    )
    .unwrap();
    let out = as_user(&["apply", "-f", vm.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forbidden") && err.contains("vic"), "{err}");
    // revoked: refused
    let name = viewer
        .strip_prefix("krv_")
        .and_then(|r| r.split('_').next())
        .unwrap()
        .to_string();
    ok(admin(&data, &["token", "revoke", &name]), "revoke");
    let out = as_user(&["get", "vms"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");
    let list = ok(admin(&data, &["token", "list"]), "token list");
    assert!(list.contains(&name) && list.contains("revoked"), "{list}");
    assert!(
        !list.contains(viewer.rsplit('_').next().unwrap()),
        "secrets never listed"
    );

    // --- unix socket: another uid is nobody until bound ---
    let nobody = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("--data-dir")
            .arg(&data)
            .args(args)
            .uid(65534)
            .gid(65534);
        run(&mut c)
    };
    let out = nobody(&["get", "vms"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("system:uid:65534"), "{err}");
    ok(
        admin(
            &data,
            &["apply", "-f", {
                let p = root.join("rb.yaml");
                std::fs::write(
                    &p,
                    "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: nobody-view}\n\
                     subjects: [{kind: User, name: \"system:uid:65534\"}]\nroleRef: {kind: ClusterRole, name: view}\n",
                )
                .unwrap();
                Box::leak(p.into_boxed_path()).to_str().unwrap()
            }],
        ),
        "bind uid 65534",
    );
    ok(nobody(&["get", "vms"]), "get vms as a bound uid");

    // --- a second process joins: krvirt agent with a join token, mTLS ---
    let join = ok(admin(&data, &["token", "create", "--join"]), "join token")
        .trim()
        .to_string();
    let adata = root.join("agent");
    let ca = data.join("pki/ca.crt");
    let agent = Proc::spawn(
        {
            let mut c = Command::new(BIN);
            c.args([
                "--server",
                &https,
                "agent",
                "--accel",
                "tcg",
                "--node-name",
                "joined",
            ])
            .arg("--data-dir")
            .arg(&adata)
            .arg("--join-token")
            .arg(&join)
            .arg("--ca")
            .arg(&ca)
            .env(
                "KRVIRT_CACHE_DIR",
                std::env::var_os("KRVIRT_CACHE_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| std::env::temp_dir().join("krvirt-test-cache")),
            );
            c
        },
        root.join("agent.log"),
    );
    let alog = || agent.log();
    until(
        "the joined host to be Ready",
        Duration::from_secs(120),
        &alog,
        || {
            let out = admin(&data, &["get", "hosts"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("joined ") && l.contains("Ready"))
        },
    );
    assert!(adata.join("agent-pki/client.crt").exists());
    // the join token was used up: a second join is refused
    let out = run(Command::new(BIN)
        .args(["--server", &https, "agent", "--node-name", "again"])
        .arg("--data-dir")
        .arg(root.join("agent2"))
        .arg("--join-token")
        .arg(&join)
        .arg("--ca")
        .arg(&ca));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") || err.contains("used"), "{err}");
    // the audit log names the agent's certificate identity
    let audit = std::fs::read_to_string(data.join("audit.log")).unwrap();
    assert!(audit.contains("system:host:joined"), "{}", tail(&audit, 5));
    drop(agent);
    drop(server);
}
