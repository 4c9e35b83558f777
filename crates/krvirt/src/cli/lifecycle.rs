//! `start`, `stop`, `restart`, `pause`, `unpause` (virtctl's verbs).

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use krvirt_client::StartOptions;

use super::{Ctx, out, required_kind};

#[derive(Debug, Args)]
pub struct StartArgs {
    /// VirtualMachine name
    pub name: String,
    /// Start the guest paused
    #[arg(long)]
    pub paused: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// VirtualMachine name
    pub name: String,
    /// Seconds the guest gets to shut down
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub grace_period: Option<i64>,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// VirtualMachine name
    pub name: String,
    /// Seconds the guest gets to shut down (only 0, a forced restart, is supported)
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub grace_period: Option<i64>,
}

/// `vm` or `vmi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmOrVmi {
    #[value(alias = "virtualmachine", alias = "virtualmachines", alias = "vms")]
    Vm,
    #[value(
        alias = "virtualmachineinstance",
        alias = "virtualmachineinstances",
        alias = "vmis"
    )]
    Vmi,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// `vm` (targets its instance) or `vmi`
    #[arg(value_enum)]
    pub kind: VmOrVmi,
    pub name: String,
}

pub async fn start(ctx: &Ctx, a: StartArgs) -> Result<ExitCode> {
    ctx.client
        .start_vm(&ctx.ns.name, &a.name, &StartOptions { paused: a.paused })
        .await?;
    out(&format!("VM {} was scheduled to start\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(ctx: &Ctx, a: StopArgs) -> Result<ExitCode> {
    ctx.client
        .stop_vm(&ctx.ns.name, &a.name, a.grace_period)
        .await?;
    out(&format!("VM {} was scheduled to stop\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn restart(ctx: &Ctx, a: RestartArgs) -> Result<ExitCode> {
    ctx.client
        .restart_vm(&ctx.ns.name, &a.name, a.grace_period)
        .await?;
    out(&format!("VM {} was scheduled to restart\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn pause(ctx: &Ctx, a: PauseArgs, pause: bool) -> Result<ExitCode> {
    if a.kind == VmOrVmi::Vm {
        // The VM must exist; a missing one is reported as such.
        let vm = required_kind("virtualmachines")?;
        ctx.client.get(vm, &ctx.ns.name, &a.name).await?;
    }
    if pause {
        ctx.client.pause_vmi(&ctx.ns.name, &a.name).await?;
    } else {
        ctx.client.unpause_vmi(&ctx.ns.name, &a.name).await?;
    }
    let verb = if pause { "pause" } else { "unpause" };
    out(&format!("VMI {} was scheduled to {verb}\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}
