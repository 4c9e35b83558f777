//! Where the CLI connects and how it authenticates, plus the `login` and
//! `token` verbs.
//!
//! The server is, in this order: `--server URL`; `--data-dir DIR` (that
//! instance's unix socket); `$KRVIRT_SERVER`; the saved login
//! (`~/.config/krvirt/config`); the unix socket of `$KRVIRT_DATA_DIR` or
//! of the default data directory (local administration, no credentials
//! needed: the server knows the caller's uid). For `https://` servers the
//! CA and the token come from `$KRVIRT_CA` (a file) / `$KRVIRT_TOKEN`, else
//! from the saved login.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use krvirt_client::{Client, Connection, PatchTarget, ServerOrigin};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Ctx, GlobalArgs, out};

/// The saved login (`krvirt login`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLogin {
    pub server: String,
    /// PEM of the CA the server's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `~/.config/krvirt/config` (or `$XDG_CONFIG_HOME/krvirt/config`).
pub fn config_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("krvirt/config")
}

fn load_login() -> Result<Option<SavedLogin>> {
    let p = config_path();
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(serde_json::from_str(&s).with_context(|| {
            format!(
                "{} is not a krvirt login (run krvirt login again)",
                p.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn save_login(l: &SavedLogin) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let p = config_path();
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("writing {}", p.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(serde_json::to_string_pretty(l)?.as_bytes())?;
    Ok(p)
}

/// The unix socket of a data directory.
pub fn socket_of(data_dir: &Path) -> String {
    format!("unix://{}", data_dir.join("krvirt.sock").display())
}

/// The connection the global options (and environment, saved login) name.
pub fn resolve(global: &GlobalArgs) -> Result<(Connection, ServerOrigin)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let with_creds = |server: String, login: Option<&SavedLogin>| -> Result<Connection> {
        let same = login.filter(|l| l.server.trim_end_matches('/') == server.trim_end_matches('/'));
        let ca = match env("KRVIRT_CA") {
            Some(f) => {
                Some(std::fs::read_to_string(&f).with_context(|| format!("$KRVIRT_CA {f}"))?)
            }
            None => same.and_then(|l| l.ca.clone()),
        };
        Ok(Connection {
            server,
            ca_pem: ca,
            token: env("KRVIRT_TOKEN").or_else(|| same.and_then(|l| l.token.clone())),
            ..Default::default()
        })
    };
    if let Some(s) = global.server.clone().filter(|s| !s.trim().is_empty()) {
        let login = load_login().ok().flatten();
        return Ok((with_creds(s, login.as_ref())?, ServerOrigin::Flag));
    }
    if let Some(d) = &global.data_dir {
        return Ok((
            Connection {
                server: socket_of(d),
                ..Default::default()
            },
            ServerOrigin::Flag,
        ));
    }
    if let Some(s) = env(krvirt_client::SERVER_ENV) {
        let login = load_login().ok().flatten();
        return Ok((with_creds(s, login.as_ref())?, ServerOrigin::Env));
    }
    if let Some(l) = load_login()? {
        return Ok((
            with_creds(l.server.clone(), Some(&l))?,
            ServerOrigin::Explicit,
        ));
    }
    let dir = env("KRVIRT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(crate::daemon::default_data_dir);
    Ok((
        Connection {
            server: socket_of(&dir),
            ..Default::default()
        },
        ServerOrigin::Default,
    ))
}

/// A client for the global options.
pub fn client(global: &GlobalArgs) -> Result<Client> {
    let (conn, origin) = resolve(global)?;
    Ok(Client::connect_from(&conn, origin)?)
}

// ----- login -----

/// `krvirt login --server https://HOST:PORT --token T [--ca FILE]`.
#[derive(Debug, Clone, Args)]
pub struct LoginArgs {
    /// Bearer token (from `krvirt token create`)
    #[arg(long)]
    pub token: String,
    /// The server's CA certificate (PEM); without it the CA the server
    /// presents is trusted on first use and its fingerprint shown
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// Accepts any certificate and remembers the chain (trust on first use).
#[derive(Debug)]
struct Capture {
    chain: std::sync::Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut c) = self.chain.lock() {
            c.push(end_entity.to_vec());
            c.extend(intermediates.iter().map(|i| i.to_vec()));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The CA certificate a server presents (the last of its chain), as PEM.
async fn fetch_ca(server: &str) -> Result<String> {
    let url = reqwest::Url::parse(server).with_context(|| format!("--server {server}"))?;
    if url.scheme() != "https" {
        bail!("--server {server}: krvirt login needs an https:// server");
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let capture = Arc::new(Capture {
        chain: Default::default(),
        provider: provider.clone(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {host}:{port}"))?;
    let chain = capture.chain.lock().map(|c| c.clone()).unwrap_or_default();
    let Some(ca) = chain.last() else {
        bail!("{server} presented no certificate");
    };
    Ok(pem_of(ca))
}

fn pem_of(der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= n {
                b64.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

pub async fn login(ctx: &Ctx, a: LoginArgs) -> Result<ExitCode> {
    let server = ctx.client.base_url().trim_end_matches('/').to_string();
    if !server.starts_with("https://") {
        bail!("krvirt login needs --server https://HOST:PORT (got {server})");
    }
    let ca = match &a.ca {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("--ca {}", f.display()))?,
        None => {
            let ca = fetch_ca(&server).await?;
            let der = krvirt_server::tls::pem_certs(&ca)?;
            let fp = der
                .first()
                .map(|c| krvirt_server::tls::fingerprint(c.as_ref()))
                .unwrap_or_default();
            eprintln!(
                "trusting the CA {server} presents (first use), SHA-256 fingerprint:\n  {fp}\n\
                 compare it with `openssl x509 -noout -fingerprint -sha256 -in DATA/pki/ca.crt` on the server"
            );
            ca
        }
    };
    let conn = Connection {
        server: server.clone(),
        ca_pem: Some(ca.clone()),
        token: Some(a.token.clone()),
        ..Default::default()
    };
    let client = Client::connect(&conn)?;
    // The token must work: list the namespaces it may see (403 is fine:
    // authenticated but not allowed to list namespaces; 401 is not).
    let kind = krvirt_api::find_kind("namespaces").context("Namespace kind")?;
    match client
        .list(kind, &krvirt_client::ListParams::all_namespaces())
        .await
    {
        Ok(_) => {}
        Err(e) if e.status().is_some_and(|s| s.code == 403) => {}
        Err(e) => return Err(e).context("the server refused the token"),
    }
    let path = save_login(&SavedLogin {
        server: server.clone(),
        ca: Some(ca),
        token: Some(a.token),
    })?;
    out(&format!(
        "logged in to {server} (saved in {})\n",
        path.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

// ----- tokens -----

/// `krvirt token …`
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token (printed once; only its hash is stored)
    Create(TokenCreateArgs),
    /// List tokens (never their secrets)
    List,
    /// Revoke a token (by name, or the token itself)
    Revoke { token: String },
}

#[derive(Debug, Clone, Args)]
pub struct TokenCreateArgs {
    /// User the token authenticates as
    #[arg(long, required_unless_present = "join")]
    pub user: Option<String>,
    /// Groups of the user (repeatable)
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Lifetime: 30m, 24h, 7d… [default: no expiry]
    #[arg(long)]
    pub ttl: Option<String>,
    /// Bind the user to this ClusterRole (admin, edit, view, or a custom
    /// one) in the namespace given by -n
    #[arg(long)]
    pub role: Option<String>,
    /// Bind the user to this ClusterRole cluster-wide (e.g. cluster-admin, view)
    #[arg(long)]
    pub cluster_role: Option<String>,
    /// A one-time join token for `krvirt agent --join-token`
    #[arg(long, conflicts_with_all = ["user", "role", "cluster_role"])]
    pub join: bool,
}

/// Parse `30s`, `15m`, `24h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<chrono::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .with_context(|| format!("--ttl {s:?}: expected a number and a unit (30m, 24h, 7d)"))?;
    let d = match unit {
        "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" | "" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        other => bail!("--ttl {s:?}: unknown unit {other:?} (use s, m, h or d)"),
    };
    if n <= 0 {
        bail!("--ttl {s:?}: must be positive");
    }
    Ok(d)
}

fn kind(name: &str) -> Result<&'static krvirt_api::KindInfo> {
    krvirt_api::find_kind(name).with_context(|| format!("kind {name} not known"))
}

pub async fn token(ctx: &Ctx, a: TokenArgs) -> Result<ExitCode> {
    match a.command {
        TokenCommand::Create(c) => token_create(ctx, c).await,
        TokenCommand::List => token_list(ctx).await,
        TokenCommand::Revoke { token } => {
            let name = krvirt_server::auth::parse_token(&token)
                .map(|(n, _)| n.to_string())
                .unwrap_or(token);
            ctx.client
                .merge_patch(
                    kind("tokens")?,
                    "",
                    &name,
                    &json!({"spec": {"revoked": true}}),
                    PatchTarget::Main,
                )
                .await?;
            out(&format!("token {name} revoked\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn token_create(ctx: &Ctx, c: TokenCreateArgs) -> Result<ExitCode> {
    let (name, token, hash) = krvirt_server::auth::new_token();
    let user = c.user.clone().unwrap_or_default();
    let mut spec = json!({"user": user, "secretHash": hash, "join": c.join});
    if !c.groups.is_empty() {
        spec["groups"] = json!(c.groups);
    }
    if let Some(ttl) = &c.ttl {
        let exp = chrono::Utc::now() + parse_ttl(ttl)?;
        spec["expires"] = json!(exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    if c.role.is_some() {
        spec["namespace"] = json!(ctx.ns.name);
    }
    ctx.client
        .create(
            kind("tokens")?,
            "",
            &json!({"apiVersion": "krvirt.io/v1", "kind": "Token", "metadata": {"name": name}, "spec": spec}),
        )
        .await?;
    let subject = json!([{"kind": "User", "name": user}]);
    if let Some(role) = &c.role {
        let b = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{name}-{role}")},
            "subjects": subject, "roleRef": {"kind": "ClusterRole", "name": role},
        });
        ctx.client
            .create(kind("rolebindings")?, &ctx.ns.name, &b)
            .await
            .context("binding the role")?;
    }
    if let Some(role) = &c.cluster_role {
        let b = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{name}-{role}")},
            "subjects": subject, "roleRef": {"kind": "ClusterRole", "name": role},
        });
        ctx.client
            .create(kind("clusterrolebindings")?, "", &b)
            .await
            .context("binding the cluster role")?;
    }
    out(&format!("{token}\n"))?;
    Ok(ExitCode::SUCCESS)
}

async fn token_list(ctx: &Ctx) -> Result<ExitCode> {
    let list = ctx
        .client
        .list(
            kind("tokens")?,
            &krvirt_client::ListParams::all_namespaces(),
        )
        .await?;
    let mut t = String::from("NAME\tUSER\tGROUPS\tEXPIRES\tSTATE\n");
    for o in list.items {
        let s = &o["spec"];
        let state = if s["revoked"] == Value::Bool(true) {
            "revoked"
        } else if s["join"] == Value::Bool(true) {
            if s["used"].is_string() {
                "join (used)"
            } else {
                "join"
            }
        } else {
            "active"
        };
        let groups: Vec<&str> = s["groups"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        t.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            o["metadata"]["name"].as_str().unwrap_or_default(),
            s["user"].as_str().unwrap_or_default(),
            groups.join(","),
            s["expires"].as_str().unwrap_or("never"),
            state
        ));
    }
    out(&t)?;
    Ok(ExitCode::SUCCESS)
}
