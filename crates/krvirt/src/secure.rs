//! The listeners of `krvirt up` / `krvirt server`: TLS on the network
//! address (CA and server certificate in `DATA/pki`), the unix socket
//! `DATA/krvirt.sock` for local administration, authentication and RBAC
//! over both; and the agent side of joining (client certificates).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use krvirt_server::auth::Auth;
use krvirt_server::tls::{Pki, TlsListener};
use krvirt_server::{AppState, Listeners, Registry};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The unix socket of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("krvirt.sock")
}

/// Bound listeners, ready to serve.
pub struct Secure {
    listeners: Listeners,
    auth: Option<Arc<Auth>>,
    pub socket: PathBuf,
    pub addr: SocketAddr,
    pub ca_fingerprint: Option<String>,
    /// The CA (None without auth): the server's identity towards agents.
    pub pki: Option<Arc<Pki>>,
}

impl Secure {
    /// `https://ADDR`, or `http://ADDR` without auth.
    pub fn url(&self) -> String {
        if self.auth.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The unix socket as a client server address.
    pub fn socket_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

async fn ensure_default_namespace(registry: &Registry) -> Result<()> {
    let kind = krvirt_api::find_kind("namespaces").context("Namespace kind")?;
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
    match registry.create(kind, "", ns).await {
        Ok(_) | Err(krvirt_server::ApiError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e).context("creating the default Namespace"),
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
}

/// Bind `listen` (TLS) and `DATA/krvirt.sock`, create the CA on first
/// start, load RBAC. `no_auth`: plain HTTP and no authentication (for
/// measuring the cost of auth only).
pub async fn listen(
    data_dir: &Path,
    listen: SocketAddr,
    registry: &Registry,
    no_auth: bool,
    shutdown: &CancellationToken,
) -> Result<Secure> {
    ensure_default_namespace(registry).await?;
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = tcp.local_addr()?;
    let socket = socket_path(data_dir);
    let unix = krvirt_server::bind_unix(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    if no_auth {
        warn!("--insecure-no-auth: plain HTTP, every request allowed (benchmarks only)");
        return Ok(Secure {
            listeners: Listeners {
                plain: Some(tcp),
                unix: Some(unix),
                tls: None,
            },
            auth: None,
            socket,
            addr,
            ca_fingerprint: None,
            pki: None,
        });
    }
    let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(hostname());
    // One CA for every server replica on this store (kept in the store).
    krvirt_server::tls::sync_cluster_ca(registry.store().as_ref(), &data_dir.join("pki"))
        .await
        .context("taking part in the cluster's CA")?;
    let pki = Arc::new(
        Pki::ensure(&data_dir.join("pki"), &names)
            .with_context(|| format!("setting up the CA in {}", data_dir.join("pki").display()))?,
    );
    let tls = TlsListener::new(tcp, pki.server_config()?)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let auth = Auth::with_pki(registry.clone(), uid, pki.clone());
    auth.start(shutdown.clone())
        .await
        .context("loading RBAC objects")?;
    Ok(Secure {
        listeners: Listeners {
            tls: Some(tls),
            unix: Some(unix),
            plain: None,
        },
        auth: Some(auth),
        socket,
        addr,
        ca_fingerprint: Some(pki.ca_fingerprint()),
        pki: Some(pki),
    })
}

impl Secure {
    /// The way to VMIs on agents' hosts: their host APIs over mutual TLS
    /// with this server's client certificate; without TLS (no CA), none.
    pub fn remote_connector(
        &self,
        registry: &Registry,
    ) -> Result<Option<krvirt_server::remote::RemoteConnector>> {
        let Some(pki) = &self.pki else {
            return Ok(None);
        };
        let tls = pki
            .host_api_client_config()
            .context("the host API client configuration")?;
        Ok(Some(krvirt_server::remote::RemoteConnector::new(
            registry.clone(),
            tls,
        )))
    }
}

/// Serve the API and `extra` routes on the listeners until `shutdown`.
pub async fn serve(
    secure: Secure,
    state: AppState,
    extra: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    krvirt_server::serve_listeners(secure.listeners, state, extra, secure.auth, async move {
        shutdown.cancelled().await
    })
    .await
}

// ----- agents -----

/// The client of a `krvirt agent`: a client certificate from
/// `DATA/agent-pki` (made by joining once with `--join-token`), else the
/// server as given (a unix socket, or $KRVIRT_TOKEN / a saved login).
pub async fn agent_client(
    data_dir: &Path,
    server: Option<String>,
    node: &str,
    join_token: Option<String>,
    ca_file: Option<PathBuf>,
) -> Result<krvirt_client::Client> {
    let dir = data_dir.join("agent-pki");
    let (crt, key, ca) = (
        dir.join("client.crt"),
        dir.join("client.key"),
        dir.join("ca.crt"),
    );
    let https = server.as_deref().is_some_and(|s| s.starts_with("https://"));
    if https {
        let server = server.clone().unwrap_or_default();
        if !crt.exists() {
            let Some(token) = join_token else {
                bail!(
                    "{} holds no client certificate: join once with --join-token (krvirt token create --join)",
                    dir.display()
                );
            };
            let ca_pem = match &ca_file {
                Some(f) => {
                    std::fs::read_to_string(f).with_context(|| format!("--ca {}", f.display()))?
                }
                None => bail!("--join-token needs --ca FILE (the server's DATA/pki/ca.crt)"),
            };
            join(&server, &ca_pem, &token, node, &dir).await?;
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let conn = krvirt_client::Connection {
            server,
            ca_pem: Some(read(&ca)?),
            client_cert_pem: Some(read(&crt)?),
            client_key_pem: Some(read(&key)?),
            token: None,
        };
        return Ok(krvirt_client::Client::connect(&conn)?);
    }
    let global = crate::cli::GlobalArgs {
        server,
        ..Default::default()
    };
    crate::cli::auth::client(&global)
}

async fn join(server: &str, ca_pem: &str, token: &str, node: &str, dir: &Path) -> Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let conn = krvirt_client::Connection {
        server: server.to_string(),
        ca_pem: Some(ca_pem.to_string()),
        ..Default::default()
    };
    let client = krvirt_client::Client::connect(&conn)?;
    let resp = client
        .http()
        .post(format!("{}/apis/krvirt.io/v1/join", client.request_base()))
        .json(&serde_json::json!({"token": token, "host": node, "csr": csr}))
        .send()
        .await
        .with_context(|| format!("joining {server}"))?;
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !code.is_success() {
        bail!(
            "joining {server}: {code}: {}",
            body["message"].as_str().unwrap_or_default()
        );
    }
    let cert = body["certificate"]
        .as_str()
        .context("join answer without certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, data) in [
        ("client.key", key.serialize_pem()),
        ("client.crt", cert.to_string()),
        ("ca.crt", ca_pem.to_string()),
    ] {
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        std::io::Write::write_all(&mut f, data.as_bytes())?;
    }
    eprintln!("joined {server} as system:host:{node}");
    Ok(())
}
