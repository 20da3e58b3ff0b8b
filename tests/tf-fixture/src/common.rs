//! Pieces shared by the provider, its resources and its data source.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tf_provider::schema::{Attribute, AttributeConstraint, AttributeType, Description};
use tf_provider::value::{Value, ValueString};
use tf_provider::{AttributePath, Diagnostics};

/// What `configure` learnt, shared by the provider and everything it serves.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// Absolute directory where resources keep their files (`None` until the
    /// provider is configured with a known value).
    pub root: Option<String>,
    /// Optional greeting, only kept.
    #[allow(dead_code)]
    pub greeting: Option<String>,
}

pub type Shared = Arc<RwLock<Settings>>;

/// The provider_meta block (`terraform { provider_meta "capstanfixture" { module = "..." } }`).
///
/// Wrapped in [`Value`] because the host sends a null object when the module
/// declares no provider_meta block.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaBlock {
    #[serde(default)]
    pub module: ValueString<'static>,
}

pub type Meta = Value<MetaBlock>;

/// Build an attribute of the given type and constraint.
pub fn attr(
    attr_type: AttributeType,
    constraint: AttributeConstraint,
    sensitive: bool,
    description: &str,
) -> Attribute {
    Attribute {
        attr_type,
        description: Description::plain(description),
        constraint,
        sensitive,
        deprecated: false,
    }
}

/// Check that `path` is a non-empty path relative to root that does not climb out of it.
pub fn check_relative(
    diags: &mut Diagnostics,
    path: &ValueString<'static>,
    attribute: &'static str,
) {
    if let Value::Value(path) = path {
        let p = Path::new(path.as_ref());
        let escapes = p
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if path.is_empty() || escapes {
            diags.error(
                "path must be relative to the provider root",
                format!("{path:?} is empty, absolute or contains \"..\""),
                AttributePath::new(attribute),
            );
        }
    }
}

/// `<root>/<path>`, or an error diagnostic when root or path is not known.
pub fn resolve(
    shared: &Shared,
    diags: &mut Diagnostics,
    path: &ValueString<'static>,
) -> Option<PathBuf> {
    let root = shared.read().ok().and_then(|s| s.root.clone());
    let Some(root) = root else {
        diags.root_error(
            "the provider has no root",
            "capstanfixture was not configured with a known, absolute `root`",
        );
        return None;
    };
    match path {
        Value::Value(path) => Some(Path::new(&root).join(path.as_ref())),
        _ => {
            diags.error_short("path is not known", AttributePath::new("path"));
            None
        }
    }
}

/// `<file>.secret`
pub fn secret_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".secret");
    PathBuf::from(s)
}

/// A fresh, practically unique hex token (random hasher keys + time + pid + counter).
pub fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

/// Remove a file; a missing file is fine.
pub async fn remove_if_present(diags: &mut Diagnostics, file: &Path) {
    match tokio::fs::remove_file(file).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => diags.root_error("could not remove file", format!("{}: {e}", file.display())),
    }
}
