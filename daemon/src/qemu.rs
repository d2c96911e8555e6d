//! The QEMU that `instant-boot --qemu` launches, tied to the daemon.
//!
//! A guest must never outlive the daemon unnoticed: QEMU's vhost-user
//! chardev has `reconnect=1`, so an orphan keeps running and reconnects
//! to the next daemon on the same socket, where a second guest started on
//! the same overlay would then overwrite its files with the orphan's stale
//! page cache. Two measures:
//! - [`spawn_tied`] sets QEMU's parent-death signal to `SIGKILL`
//!   (`prctl(PR_SET_PDEATHSIG)` between fork and exec): when the daemon
//!   dies, even by `kill -9`, the kernel kills its QEMU. The signal follows
//!   the *thread* that spawned QEMU, so spawn it from the thread that lives
//!   as long as the daemon (the main thread). A daemon that died before
//!   the `prctl` is caught by comparing the parent PID after it.
//! - the caller records the QEMU in the state dir (`qemu.json`, see
//!   [`crate::state_dir`]); a daemon asked to start a guest on that state
//!   refuses while the recorded QEMU runs.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Spawns `cmd` so that the kernel kills it with `SIGKILL` when the
/// calling thread's process exits (see the module doc).
pub fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes two system calls (prctl, getppid), both async-signal-safe; it
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::Kill))?;
            if rustix::process::getppid() != Some(parent) {
                // The daemon is already gone: do not start an orphan.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tied_child_dies_with_its_parent() {
        // The parent-death signal follows the spawning thread: a thread
        // that spawns a child and exits stands in for a daemon that dies.
        let (tx, rx) = std::sync::mpsc::channel();
        let spawner = std::thread::spawn(move || {
            let child = spawn_tied(Command::new("sleep").arg("60")).unwrap();
            tx.send(child).unwrap();
        });
        let mut child = rx.recv().unwrap();
        spawner.join().unwrap();
        // The spawning thread has exited: the kernel sends SIGKILL.
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }
}
