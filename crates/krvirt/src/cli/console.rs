//! `console` (serial console over a WebSocket) and `logs` (console log).

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use super::Ctx;

/// Ctrl-]: leaves the console.
pub const ESCAPE: u8 = 0x1d;

/// With piped input: once stdin ends, keep printing guest output until
/// it has been quiet this long.
pub const DRAIN_AFTER_EOF: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// VirtualMachine (or VirtualMachineInstance) name
    pub name: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// VirtualMachine (or VirtualMachineInstance) name
    pub name: String,
    /// Keep streaming new output
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// The terminal in raw mode; restored when dropped (every exit path,
/// unwinding included).
struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode when stdin is a terminal; `None` otherwise.
    fn enter() -> Result<Option<RawTerminal>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin).context("cannot read the terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// Split input at the escape byte: what to send, and whether to leave.
pub fn split_at_escape(data: &[u8]) -> (&[u8], bool) {
    match data.iter().position(|&b| b == ESCAPE) {
        Some(i) => (&data[..i], true),
        None => (data, false),
    }
}

/// Read stdin on a plain thread (an interactive read cannot be
/// cancelled; the thread simply ends with the process). `None` = EOF.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
            }
        }
    });
    rx
}

pub async fn console(ctx: &Ctx, a: ConsoleArgs) -> Result<ExitCode> {
    let con = ctx.client.console(&ctx.ns.name, &a.name).await?;
    eprintln!(
        "Successfully connected to {} console. The escape sequence is ^]",
        a.name
    );
    let raw = RawTerminal::enter()?;
    let result = session(con).await;
    let was_raw = raw.is_some();
    drop(raw);
    if was_raw {
        eprintln!();
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn session(con: krvirt_client::Console) -> Result<()> {
    let (mut tx, mut rx) = con.split();
    let mut input = stdin_reader();
    let mut stdout = tokio::io::stdout();
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stdin_open = true;
    let mut drain_deadline = Instant::now();
    loop {
        tokio::select! {
            chunk = rx.next() => match chunk {
                Some(Ok(bytes)) => {
                    stdout.write_all(&bytes).await?;
                    stdout.flush().await?;
                    if !stdin_open {
                        drain_deadline = Instant::now() + DRAIN_AFTER_EOF;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()), // the server closed the console
            },
            data = input.recv(), if stdin_open => match data {
                Some(Some(data)) => {
                    let (send, leave) = split_at_escape(&data);
                    if !send.is_empty() {
                        tx.send(send).await?;
                    }
                    if leave {
                        let _ = tx.close().await;
                        return Ok(());
                    }
                }
                Some(None) | None => {
                    stdin_open = false;
                    drain_deadline = Instant::now() + DRAIN_AFTER_EOF;
                }
            },
            _ = tokio::time::sleep_until(drain_deadline), if !stdin_open => {
                let _ = tx.close().await;
                return Ok(());
            }
            _ = term.recv() => break,
            _ = hup.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = tx.close().await;
    Ok(())
}

pub async fn logs(ctx: &Ctx, a: LogsArgs) -> Result<ExitCode> {
    let mut s = ctx
        .client
        .console_log(&ctx.ns.name, &a.name, a.follow)
        .await?;
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = s.next().await {
        stdout.write_all(&chunk?).await?;
        stdout.flush().await?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_splits_input() {
        assert_eq!(split_at_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_at_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_escape(b"\x1d"), (&b""[..], true));
        assert_eq!(split_at_escape(b""), (&b""[..], false));
    }
}
