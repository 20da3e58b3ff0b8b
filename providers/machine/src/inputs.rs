//! The `nixos` type's inputs and outputs, with the checks that need no machine.

use std::collections::BTreeMap;

use capstan_provider::schemars::{self, JsonSchema};
use capstan_provider::OperationError;
use serde::{Deserialize, Serialize};

use crate::checks::Check;
use crate::ssh::Target;

/// What `switch-to-configuration` is asked to do.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Goal {
    /// Activate now and at boot
    #[default]
    Switch,
    /// Activate at the next boot only
    Boot,
    /// Activate now, not at boot
    Test,
    /// Print what would change
    DryActivate,
}

impl Goal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Goal::Switch => "switch",
            Goal::Boot => "boot",
            Goal::Test => "test",
            Goal::DryActivate => "dry-activate",
        }
    }

    /// Whether it points the profile at the system.
    pub(crate) fn sets_profile(self) -> bool {
        matches!(self, Goal::Switch | Goal::Boot)
    }

    /// Whether it changes what runs now (and so can cut the connection).
    pub(crate) fn activates_now(self) -> bool {
        matches!(self, Goal::Switch | Goal::Test)
    }
}

/// Where a `.drv` is built.
#[derive(Clone, Copy, Debug, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BuildOn {
    /// Here (or on Nix's remote builders, with `builders`)
    #[default]
    Local,
    /// On the machine itself
    Target,
}

/// A secret to put on the machine, outside the Nix store.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Key {
    /// The secret itself
    pub(crate) value: String,
    /// The directory it goes to (default /run/keys)
    #[serde(default = "default_key_dir")]
    pub(crate) dir: String,
    /// Its owner (default root)
    #[serde(default = "root")]
    pub(crate) user: String,
    /// Its group (default root)
    #[serde(default = "root")]
    pub(crate) group: String,
    /// Its permission bits in octal (default 0400)
    #[serde(default = "default_key_mode")]
    pub(crate) mode: String,
}

pub(crate) fn default_key_dir() -> String {
    "/run/keys".into()
}
pub(crate) fn root() -> String {
    "root".into()
}
pub(crate) fn default_key_mode() -> String {
    "0400".into()
}
pub(crate) fn default_port() -> u16 {
    22
}
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn default_profile() -> String {
    "/nix/var/nix/profiles/system".into()
}
pub(crate) fn default_confirm_timeout() -> u64 {
    30
}
pub(crate) fn default_check_timeout() -> u64 {
    60
}
pub(crate) fn default_check_interval() -> u64 {
    2
}
pub(crate) fn default_reboot_command() -> String {
    "systemctl reboot".into()
}
pub(crate) fn default_reboot_timeout() -> u64 {
    300
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MachineIn {
    /// Where to deploy: `user@host`, or `host` for root
    pub(crate) target: String,
    /// The SSH port (default 22)
    #[serde(default = "default_port")]
    pub(crate) port: u16,
    /// The machine's SSH host key, pinned: `ssh-ed25519 AAAA…` (no other key is accepted)
    pub(crate) host_key: String,
    /// A private key file to log in with (default: what ssh picks)
    #[serde(default)]
    pub(crate) identity: Option<String>,
    /// The system: a NixOS toplevel store path, or its `.drv` to build first
    pub(crate) system: String,
    /// `switch` (default), `boot`, `test` or `dry-activate`
    #[serde(default)]
    pub(crate) goal: Goal,
    /// Where a `.drv` is built: `local` (default; Nix's remote builders with `builders`) or `target`
    #[serde(default)]
    pub(crate) build_on: BuildOn,
    /// Nix remote builders for a local build, in Nix's `--builders` syntax
    #[serde(default)]
    pub(crate) builders: Option<String>,
    /// Let the machine fetch what it can from its own substituters
    #[serde(default)]
    pub(crate) substitute_on_destination: bool,
    /// Whether the machine requires signed paths (false: `--no-check-sigs`, for unsigned builds)
    #[serde(default = "yes")]
    pub(crate) check_sigs: bool,
    /// Become root with `sudo -n` on the machine (when the SSH user is not root)
    #[serde(default)]
    pub(crate) sudo: bool,
    /// The system profile (default /nix/var/nix/profiles/system)
    #[serde(default = "default_profile")]
    pub(crate) profile: String,
    /// Seconds the machine waits for a confirmation over a new SSH connection before it rolls back by itself (default 30; 0: no magic rollback)
    #[serde(default = "default_confirm_timeout")]
    pub(crate) confirm_timeout: u64,
    /// Health checks after activation: `{"command": "…"}` on the machine, `{"http": "http://…", "status": 200}` from here
    #[serde(default)]
    pub(crate) checks: Vec<Check>,
    /// Seconds the checks have to pass (default 60)
    #[serde(default = "default_check_timeout")]
    pub(crate) check_timeout: u64,
    /// Seconds between check attempts (default 2)
    #[serde(default = "default_check_interval")]
    pub(crate) check_interval: u64,
    /// Roll back when a health check fails (default true)
    #[serde(default = "yes")]
    pub(crate) rollback_on_failure: bool,
    /// Secrets to upload, by name: `{"value": …, "dir": "/run/keys", "user": "root", "group": "root", "mode": "0400"}`
    #[serde(default)]
    pub(crate) keys: BTreeMap<String, Key>,
    /// Reboot after the activation and wait for SSH (how a `boot` goal starts the new system)
    #[serde(default)]
    pub(crate) reboot: bool,
    /// The command that reboots (default `systemctl reboot`)
    #[serde(default = "default_reboot_command")]
    pub(crate) reboot_command: String,
    /// Seconds to wait for SSH after a reboot (default 300)
    #[serde(default = "default_reboot_timeout")]
    pub(crate) reboot_timeout: u64,
}

#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MachineOut {
    /// The system deployed (its toplevel store path)
    pub(crate) system: String,
    /// Its profile generation (0 when the goal sets no profile: `test`, `dry-activate`)
    pub(crate) generation: u64,
    /// What the machine runs now (`/run/current-system`)
    pub(crate) running: String,
    /// What it ran before this deployment
    pub(crate) previous: String,
    /// Where each key went, by name
    #[serde(default)]
    pub(crate) key_paths: BTreeMap<String, String>,
}

impl MachineIn {
    pub(crate) fn check(&self) -> Result<Target, OperationError> {
        let target = Target::parse(&self.target, self.port)?;
        if !self.system.starts_with('/') {
            return Err(OperationError::invalid_input(format!(
                "input `system` ({:?}) is not a store path: give the toplevel, e.g. a `$ref` to a `nix` build's `outPath`",
                self.system
            )));
        }
        if !self.profile.starts_with('/') {
            return Err(OperationError::invalid_input(format!(
                "input `profile` ({:?}) is not an absolute path",
                self.profile
            )));
        }
        if self.goal == Goal::DryActivate && self.reboot {
            return Err(OperationError::invalid_input(
                "`reboot` with goal `dry-activate`: a dry activation changes nothing to reboot into",
            ));
        }
        if self.check_interval == 0 {
            return Err(OperationError::invalid_input("input `checkInterval` is 0"));
        }
        for check in &self.checks {
            check.validate()?;
        }
        for (name, key) in &self.keys {
            key_path(name, key)?;
        }
        Ok(target)
    }
}

/// Where key `name` goes, once its settings are checked.
pub(crate) fn key_path(name: &str, key: &Key) -> Result<String, OperationError> {
    let bad = |why: String| OperationError::invalid_input(format!("key `{name}`: {why}"));
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(bad("a key's name is a file name (no `/`)".into()));
    }
    if !key.dir.starts_with('/') || key.dir.starts_with("/nix/store") {
        return Err(bad(format!(
            "`dir` ({}) must be an absolute path outside the Nix store",
            key.dir
        )));
    }
    let digits = key.mode.trim_start_matches("0o");
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(bad(format!(
            "`mode` ({}) is not octal permission bits like \"0400\"",
            key.mode
        )));
    }
    let fine = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !fine(&key.user) || !fine(&key.group) {
        return Err(bad("`user` and `group` are user and group names".into()));
    }
    Ok(format!("{}/{name}", key.dir.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_before_anything_is_sent() {
        let key = |dir: &str, mode: &str| Key {
            value: "s3cret".into(),
            dir: dir.into(),
            user: "root".into(),
            group: "root".into(),
            mode: mode.into(),
        };
        assert_eq!(
            key_path("db", &key("/run/keys/", "0400")).unwrap(),
            "/run/keys/db"
        );
        assert!(key_path("../x", &key("/run/keys", "0400")).is_err());
        assert!(key_path("db", &key("/nix/store/k", "0400")).is_err());
        assert!(key_path("db", &key("keys", "0400")).is_err());
        assert!(key_path("db", &key("/run/keys", "0999")).is_err());
        assert!(key_path("db", &key("/run/keys", "rw")).is_err());
    }
}
