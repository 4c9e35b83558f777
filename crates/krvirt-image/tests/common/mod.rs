//! QEMU harness for the guest boot tests: runs qemu-system-x86_64 under
//! TCG with the serial console in a log file (and a socket for input), a
//! QMP socket, and kills QEMU when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// QEMU tests run one at a time: the machine has 2 cores and the timings
/// they report should not measure each other.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn qemu_lock() -> MutexGuard<'static, ()> {
    QEMU_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub const QEMU: &str = "qemu-system-x86_64";
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Generous limit for one marker under TCG on a loaded 2-core machine.
pub const MARKER_TIMEOUT: Duration = Duration::from_secs(90);

pub fn require_qemu() {
    let ok = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{QEMU} is not runnable: install the Debian package qemu-system-x86"
    );
}

pub enum Boot<'a> {
    /// BIOS boot from this disk (first virtio disk).
    Disk(&'a Path),
    /// UEFI (OVMF, no Secure Boot) boot from this disk.
    DiskUefi(&'a Path),
    /// Direct kernel boot.
    Kernel {
        kernel: &'a Path,
        initrd: &'a Path,
        append: &'a str,
    },
}

pub struct VmSpec<'a> {
    pub boot: Boot<'a>,
    pub seed: Option<&'a Path>,
    pub nic: bool,
    /// Extra QEMU arguments.
    pub extra: &'a [&'a str],
    /// Guest RAM in MiB.
    pub memory_mib: u32,
}

pub struct Qemu {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub qmp: PathBuf,
    pub serial_sock: PathBuf,
    pub started: Instant,
}

impl Qemu {
    pub fn start(dir: &Path, spec: &VmSpec) -> Qemu {
        require_qemu();
        let log = dir.join("console.log");
        let qmp = dir.join("qmp.sock");
        let serial_sock = dir.join("serial.sock");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-machine", "q35", "-smp", "1"])
            .arg("-m")
            .arg(format!("{}M", spec.memory_mib))
            .args(["-display", "none", "-monitor", "none", "-nodefaults"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=off",
                serial_sock.display(),
                log.display()
            ))
            .args(["-serial", "chardev:ser0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        match &spec.boot {
            Boot::Disk(disk) => {
                cmd.arg("-drive").arg(format!(
                    "file={},format=raw,if=virtio,snapshot=on",
                    disk.display()
                ));
            }
            Boot::DiskUefi(disk) => {
                let code = Path::new(OVMF_CODE);
                let vars = Path::new(OVMF_VARS);
                assert!(
                    code.is_file() && vars.is_file(),
                    "{OVMF_CODE} / {OVMF_VARS} missing: install the Debian package ovmf"
                );
                let my_vars = dir.join("OVMF_VARS.fd");
                std::fs::copy(vars, &my_vars).expect("copy OVMF vars");
                cmd.arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        my_vars.display()
                    ))
                    .arg("-drive")
                    .arg(format!(
                        "file={},format=raw,if=virtio,snapshot=on",
                        disk.display()
                    ));
            }
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => {
                cmd.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .arg("-append")
                    .arg(append);
            }
        }
        if let Some(seed) = spec.seed {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                seed.display()
            ));
        }
        if spec.nic {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        cmd.args(spec.extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("qemu.stderr")).expect("create qemu.stderr"),
            ));
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
        Qemu {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
            qmp,
            serial_sock,
            started,
        }
    }

    pub fn console(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    fn fail(&self, what: &str) -> ! {
        let stderr = std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default();
        panic!(
            "{what} (after {:.1?})\n--- qemu stderr ---\n{stderr}\n--- console ---\n{}",
            self.started.elapsed(),
            self.console()
        );
    }

    /// Wait until the console shows `needle`; returns the time since QEMU started.
    pub fn wait_for(&mut self, needle: &str) -> Duration {
        let deadline = Instant::now() + MARKER_TIMEOUT;
        loop {
            if self.console().contains(needle) {
                return self.started.elapsed();
            }
            if let Some(st) = self.try_wait() {
                self.fail(&format!("QEMU exited ({st}) before {needle:?} appeared"));
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out waiting for {needle:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                self.fail(&format!("QEMU still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send one QMP command (after capabilities negotiation); returns the reply line.
    pub fn qmp(&self, command: &str) -> String {
        let mut s = UnixStream::connect(&self.qmp)
            .unwrap_or_else(|e| self.fail(&format!("QMP connect {}: {e}", self.qmp.display())));
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone QMP stream"));
        let mut line = String::new();
        r.read_line(&mut line).expect("QMP greeting");
        assert!(line.contains("\"QMP\""), "unexpected QMP greeting {line}");
        let mut call = |cmd: &str| -> String {
            writeln!(s, "{{\"execute\":\"{cmd}\"}}").expect("QMP write");
            loop {
                let mut l = String::new();
                let n = r.read_line(&mut l).expect("QMP read");
                assert!(n > 0, "QMP closed while waiting for reply to {cmd}");
                if l.contains("\"return\"") || l.contains("\"error\"") {
                    return l;
                }
            }
        };
        let caps = call("qmp_capabilities");
        assert!(caps.contains("\"return\""), "qmp_capabilities: {caps}");
        call(command)
    }

    /// Type a line on the serial console.
    pub fn type_line(&self, line: &str) {
        let mut s = UnixStream::connect(&self.serial_sock).unwrap_or_else(|e| {
            self.fail(&format!(
                "serial connect {}: {e}",
                self.serial_sock.display()
            ))
        });
        s.write_all(line.as_bytes()).expect("serial write");
        s.write_all(b"\n").expect("serial write");
        // Keep the connection open briefly so QEMU reads everything.
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
