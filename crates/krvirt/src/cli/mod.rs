//! The client verbs of the `krvirt` binary (`apply`, `get`, `console`…).
//! They talk to a krvirt API server through `krvirt-client`.
//!
//! `main.rs` owns the top-level parser: it flattens [`GlobalArgs`] and
//! [`ClientCommand`] into its own command set next to the daemon roles
//! (`up`, `server`, `agent`) and hands client verbs to [`run`].

mod apply;
mod audit;
pub mod auth;
mod console;
mod create;
mod describe;
mod events;
mod get;
mod hosts;
mod image;
mod lifecycle;
pub mod manifest;
mod output;
pub mod table;
mod volume;
mod wait;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use krvirt_api::KindInfo;
use krvirt_client::{Client, ClientError};

pub use apply::LAST_APPLIED;

/// Options every verb understands (given before or after the verb).
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// krvirt API server: https://HOST:PORT or unix:///PATH (else
    /// --data-dir, $KRVIRT_SERVER, the saved `krvirt login`, or the local
    /// instance's unix socket)
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,

    /// Talk to the local instance of this data directory, through its unix
    /// socket (given before the verb)
    #[arg(long = "data-dir", id = "client_data_dir", value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// Namespace of the objects [default: default]
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// The client verbs.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create or update objects from manifest files (YAML or JSON)
    Apply(apply::ApplyArgs),
    /// Create objects from manifest files (fails if they exist), or a VM from a template
    Create(create::CreateArgs),
    /// Delete objects by kind and name, or those in manifest files
    Delete(apply::DeleteArgs),
    /// List objects or show some of them
    Get(get::GetArgs),
    /// Show an object in detail
    Describe(describe::DescribeArgs),
    /// Start a virtual machine
    Start(lifecycle::StartArgs),
    /// Stop a virtual machine
    Stop(lifecycle::StopArgs),
    /// Restart a virtual machine
    Restart(lifecycle::RestartArgs),
    /// Pause a running virtual machine (its instance)
    Pause(lifecycle::PauseArgs),
    /// Resume a paused virtual machine (its instance)
    Unpause(lifecycle::PauseArgs),
    /// Attach to a virtual machine's serial console (leave with Ctrl-])
    Console(console::ConsoleArgs),
    /// Print a virtual machine's serial console log
    Logs(console::LogsArgs),
    /// Wait until an object reaches a state (uses a watch)
    Wait(wait::WaitArgs),
    /// List events (what happened to objects); -w keeps streaming
    Events(events::EventsArgs),
    /// Verify or show the audit log of a data directory
    Audit(audit::AuditArgs),
    /// Hot-plug a Volume into a running virtual machine
    Addvolume(volume::AddVolumeArgs),
    /// Detach a hot-plugged Volume from a running virtual machine
    Removevolume(volume::RemoveVolumeArgs),
    /// Volume operations: upload (fill an `upload` Volume from a local file)
    Volume(volume::VolumeArgs),
    /// Manage disk images: list, import, upload, tag, inspect, rm, gc, verify
    Image(image::ImageArgs),
    /// Live-migrate a running virtual machine to another host (--cancel stops it)
    Migrate(hosts::MigrateArgs),
    /// Mark a host unschedulable: no new VMs are placed there
    Cordon(hosts::HostArgs),
    /// Mark a host schedulable again
    Uncordon(hosts::HostArgs),
    /// Cordon a host and move its VMs away (live migration where evictionStrategy allows)
    Drain(hosts::DrainArgs),
    /// Add or remove host taints: `taint host NAME key=value:NoSchedule`, `key-`
    Taint(hosts::TaintArgs),
    /// Print client and server versions
    Version,
    /// Save a server, its CA and a bearer token (--server https://…)
    Login(auth::LoginArgs),
    /// Create, list and revoke bearer tokens
    Token(auth::TokenArgs),
}

/// The `-n` value and whether it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub explicit: bool,
}

/// What every verb needs.
pub struct Ctx {
    pub client: Client,
    pub ns: Namespace,
}

impl Ctx {
    fn new(global: &GlobalArgs) -> Result<Ctx> {
        let client: Client = auth::client(global)?;
        let ns = match global.namespace.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => Namespace {
                name: n.to_string(),
                explicit: true,
            },
            None => Namespace {
                name: "default".into(),
                explicit: false,
            },
        };
        Ok(Ctx { client, ns })
    }
}

/// Run one client verb; errors are printed here.
pub async fn run(global: GlobalArgs, cmd: ClientCommand) -> ExitCode {
    let result = match Ctx::new(&global) {
        Ok(ctx) => dispatch(&ctx, cmd).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(ctx: &Ctx, cmd: ClientCommand) -> Result<ExitCode> {
    match cmd {
        ClientCommand::Apply(a) => apply::apply(ctx, a).await,
        ClientCommand::Create(a) => create::create(ctx, a).await,
        ClientCommand::Delete(a) => apply::delete(ctx, a).await,
        ClientCommand::Get(a) => get::get(ctx, a).await,
        ClientCommand::Describe(a) => describe::describe(ctx, a).await,
        ClientCommand::Start(a) => lifecycle::start(ctx, a).await,
        ClientCommand::Stop(a) => lifecycle::stop(ctx, a).await,
        ClientCommand::Restart(a) => lifecycle::restart(ctx, a).await,
        ClientCommand::Pause(a) => lifecycle::pause(ctx, a, true).await,
        ClientCommand::Unpause(a) => lifecycle::pause(ctx, a, false).await,
        ClientCommand::Console(a) => console::console(ctx, a).await,
        ClientCommand::Logs(a) => console::logs(ctx, a).await,
        ClientCommand::Wait(a) => wait::wait(ctx, a).await,
        ClientCommand::Events(a) => events::events(ctx, a).await,
        ClientCommand::Audit(a) => audit::audit(a).await,
        ClientCommand::Addvolume(a) => volume::add(ctx, a).await,
        ClientCommand::Removevolume(a) => volume::remove(ctx, a).await,
        ClientCommand::Volume(a) => volume::volume(ctx, a).await,
        ClientCommand::Image(a) => image::image(ctx, a).await,
        ClientCommand::Migrate(a) => hosts::migrate(ctx, a).await,
        ClientCommand::Cordon(a) => hosts::cordon(ctx, a, true).await,
        ClientCommand::Uncordon(a) => hosts::cordon(ctx, a, false).await,
        ClientCommand::Drain(a) => hosts::drain(ctx, a).await,
        ClientCommand::Taint(a) => hosts::taint(ctx, a).await,
        ClientCommand::Version => version(ctx).await,
        ClientCommand::Login(a) => auth::login(ctx, a).await,
        ClientCommand::Token(a) => auth::token(ctx, a).await,
    }
}

async fn version(ctx: &Ctx) -> Result<ExitCode> {
    out(&format!("Client Version: v{}\n", env!("CARGO_PKG_VERSION")))?;
    let v = ctx.client.server_version().await?;
    let server = ["gitVersion", "version"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|s| s.as_str()).map(str::to_string))
        .unwrap_or_else(|| v.to_string());
    out(&format!("Server Version: {server}\n"))?;
    Ok(ExitCode::SUCCESS)
}

// ----- output and errors -----

/// Write to stdout (an error, not a panic, when stdout is gone).
pub fn out(s: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.flush()?;
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `error: <message>` and, for a server Status, one `  field: message`
/// line per cause.
pub fn format_error(e: &anyhow::Error) -> String {
    let mut msg = format!("{e:#}");
    let status = e
        .chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .and_then(ClientError::status);
    if let Some(status) = status
        && !status.causes().is_empty()
    {
        // Kubernetes repeats the causes in the message as `…: [a, b]`;
        // they get a line each below instead.
        if let Some(i) = status.message.find(": [")
            && status.message.ends_with(']')
            && msg.ends_with(&status.message[i..])
        {
            msg.truncate(msg.len() - (status.message.len() - i));
        }
    }
    let mut s = format!("error: {msg}\n");
    if let Some(status) = status {
        for c in status.causes() {
            match (c.field.is_empty(), c.message.is_empty()) {
                (false, _) => s.push_str(&format!("  {}: {}\n", c.field, c.message)),
                (true, false) => s.push_str(&format!("  {}\n", c.message)),
                (true, true) => {}
            }
        }
    }
    s
}

pub fn print_error(e: &anyhow::Error) {
    let _ = std::io::stderr().write_all(format_error(e).as_bytes());
}

// ----- kinds -----

/// `virtualmachines (vm, vms), virtualmachineinstances (vmi, vmis), hosts`.
pub fn known_kinds_sentence() -> String {
    let ks = krvirt_api::kinds();
    if ks.is_empty() {
        return "this build serves no kinds".into();
    }
    let list: Vec<String> = ks
        .iter()
        .map(|k| {
            if k.short_names.is_empty() {
                k.plural.to_string()
            } else {
                format!("{} ({})", k.plural, k.short_names.join(", "))
            }
        })
        .collect();
    format!("known kinds: {}", list.join(", "))
}

/// Look a kind up by any of its names, or say which ones exist.
pub fn resolve_kind(name: &str) -> Result<&'static KindInfo> {
    let bare = name.split('.').next().unwrap_or(name);
    krvirt_api::find_kind(name)
        .or_else(|| {
            // `virtualmachines.kubevirt.io` / `vm.kubevirt.io`
            let group = name.split_once('.').map(|(_, g)| g)?;
            krvirt_api::find_kind(bare).filter(|k| k.group == group)
        })
        .ok_or_else(|| anyhow!("unknown kind {name:?}; {}", known_kinds_sentence()))
}

/// A kind the client verbs need by name (VM, VMI).
pub fn required_kind(name: &str) -> Result<&'static KindInfo> {
    krvirt_api::find_kind(name).ok_or_else(|| {
        anyhow!(
            "this build does not serve {name}; {}",
            known_kinds_sentence()
        )
    })
}

/// Parse `KIND NAME...` or `KIND/NAME...` positional arguments.
pub fn parse_targets(args: &[String]) -> Result<Vec<(&'static KindInfo, Vec<String>)>> {
    let Some(first) = args.first() else {
        return Err(anyhow!(
            "name a kind (e.g. `vms`); {}",
            known_kinds_sentence()
        ));
    };
    if first.contains('/') {
        let mut out: Vec<(&'static KindInfo, Vec<String>)> = Vec::new();
        for a in args {
            let Some((k, n)) = a.split_once('/') else {
                return Err(anyhow!(
                    "mixing KIND/NAME and plain names: write {a:?} as KIND/{a}"
                ));
            };
            if n.is_empty() || n.contains('/') {
                return Err(anyhow!("{a:?} is not KIND/NAME"));
            }
            let kind = resolve_kind(k)?;
            match out.iter_mut().find(|(kk, _)| *kk == kind) {
                Some((_, names)) => names.push(n.to_string()),
                None => out.push((kind, vec![n.to_string()])),
            }
        }
        return Ok(out);
    }
    let kinds: Vec<&str> = first.split(',').collect();
    if kinds.len() > 1 && args.len() > 1 {
        return Err(anyhow!("names cannot follow several kinds ({first})"));
    }
    let mut out = Vec::new();
    for k in kinds {
        out.push((resolve_kind(k)?, args[1..].to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use krvirt_client::{Status, StatusCause, StatusDetails};

    #[test]
    fn errors_print_message_and_field_causes() {
        let status = Status {
            kind: "Status".into(),
            message: "VirtualMachine.kubevirt.io \"x\" is invalid".into(),
            reason: "Invalid".into(),
            code: 422,
            details: Some(StatusDetails {
                causes: vec![
                    StatusCause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value".into(),
                        field: "spec.template.spec.domain.devices".into(),
                    },
                    StatusCause {
                        reason: "FieldValueInvalid".into(),
                        message: "must be positive".into(),
                        field: "spec.template.spec.domain.cpu.cores".into(),
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = anyhow::Error::new(ClientError::Api(Box::new(status)));
        assert_eq!(
            format_error(&e),
            concat!(
                "error: VirtualMachine.kubevirt.io \"x\" is invalid\n",
                "  spec.template.spec.domain.devices: Required value\n",
                "  spec.template.spec.domain.cpu.cores: must be positive\n",
            )
        );
        // The causes Kubernetes repeats in brackets are not printed twice.
        let mut dup = Status {
            message:
                "VirtualMachine.kubevirt.io \"x\" is invalid: [spec.a: Required value, spec.b: bad]"
                    .into(),
            ..Default::default()
        };
        dup.details = Some(StatusDetails {
            causes: vec![StatusCause {
                field: "spec.a".into(),
                message: "Required value".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let d = anyhow::Error::new(ClientError::Api(Box::new(dup))).context("f.yaml document 1");
        assert_eq!(
            format_error(&d),
            "error: f.yaml document 1: VirtualMachine.kubevirt.io \"x\" is invalid\n  spec.a: Required value\n"
        );
        let e = e.context("vm.yaml document 2");
        assert!(
            format_error(&e).starts_with("error: vm.yaml document 2: VirtualMachine.kubevirt.io"),
            "{}",
            format_error(&e)
        );
        assert_eq!(format_error(&anyhow!("plain")), "error: plain\n");
    }

    #[test]
    fn kinds_resolve_by_any_name_and_unknown_ones_list_the_known() {
        for n in [
            "vm",
            "vms",
            "VirtualMachine",
            "virtualmachines",
            "virtualmachines.kubevirt.io",
        ] {
            assert_eq!(resolve_kind(n).expect(n).kind, "VirtualMachine", "{n}");
        }
        assert_eq!(
            resolve_kind("vmi").expect("vmi").kind,
            "VirtualMachineInstance"
        );
        assert_eq!(resolve_kind("hosts").expect("hosts").kind, "Host");
        let e = resolve_kind("pods").expect_err("pods").to_string();
        assert!(e.starts_with("unknown kind \"pods\"; known kinds: "), "{e}");
        assert!(e.contains("virtualmachines (vm, vms)"), "{e}");
        assert!(e.contains("virtualmachineinstances (vmi, vmis)"), "{e}");
        assert!(e.contains("hosts"), "{e}");
        assert!(resolve_kind("vm.example.com").is_err());
    }

    #[test]
    fn targets_parse_kind_names_and_slash_forms() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let t = parse_targets(&s(&["vm", "a", "b"])).expect("kind names");
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].0.plural, t[0].1.clone()),
            ("virtualmachines", s(&["a", "b"]))
        );
        let t = parse_targets(&s(&["vm/a", "vmi/b", "vms/c"])).expect("slash");
        let got: Vec<(&str, Vec<String>)> = t.iter().map(|(k, n)| (k.plural, n.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("virtualmachines", s(&["a", "c"])),
                ("virtualmachineinstances", s(&["b"]))
            ]
        );
        let t = parse_targets(&s(&["vm,vmi"])).expect("several kinds");
        assert_eq!(t.len(), 2);
        assert!(parse_targets(&s(&["vm/a", "b"])).is_err());
        assert!(parse_targets(&s(&["vm,vmi", "a"])).is_err());
        assert!(parse_targets(&s(&["vm/"])).is_err());
        assert!(parse_targets(&[]).is_err());
    }
}
