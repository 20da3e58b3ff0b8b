//! Child processes that die with their parent: the one place where Capstan's crates set up a
//! child between `fork` and `exec` (through `rustix`, no raw `libc`).
//!
//! A command that Capstan starts for a run (a Nix evaluation, a Terraform provider) must not
//! outlive the process that started it, even one killed with SIGKILL, which runs no cleanup:
//! the kernel's parent-death signal does that. Each such child also gets a process group of
//! its own, so a Ctrl-C at the terminal reaches Capstan alone, which decides how to stop it.
//!
//! ```no_run
//! let mut command = tokio::process::Command::new("sleep");
//! command.arg("60");
//! capstan_process::dies_with_parent(&mut command);
//! let child = command.spawn()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use rustix::process::{set_parent_process_death_signal, Signal};

/// Makes `command`'s child get SIGKILL when the thread that spawned it ends (its parent
/// died), puts it in a process group of its own, and kills it when its `Child` is dropped.
pub fn dies_with_parent(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    command.process_group(0).kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and makes one system call (`prctl`),
    // which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)
        });
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_child_runs_in_a_group_of_its_own() {
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", "ps -o pgid= -p $$"])
            .stdout(std::process::Stdio::piped());
        dies_with_parent(&mut command);
        let child = command.spawn().expect("sh starts");
        let pid = child.id().expect("a pid");
        let output = child.wait_with_output().await.expect("sh ends");
        let group: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a pgid");
        assert_eq!(group, pid, "its own process group, led by itself");
    }
}
