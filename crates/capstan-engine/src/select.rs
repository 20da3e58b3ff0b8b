//! `--target`: a run limited to some resources (by address, glob or tag) and what they
//! depend on; everything else is left as it is and said to be.

use std::collections::HashSet;

use crate::model::Deployment;
use crate::plan::{Action, PlannedChange};
use crate::state::State;

/// What `--target` selects: resources by address (`web`, `machines.web`), glob (`machines.*`,
/// `web?`) or tag (`@frontend`).
#[derive(Clone, Debug)]
pub struct Selection {
    patterns: Vec<Pattern>,
}

#[derive(Clone, Debug)]
enum Pattern {
    Tag(String),
    Glob(String),
}

impl Selection {
    /// Reads `--target` values; an empty one is an error.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for value in values {
            let value = value.trim();
            if value.is_empty() || value == "@" {
                return Err("--target takes an address (`web`), a glob (`machines.*`) or a tag (`@frontend`), not nothing".into());
            }
            patterns.push(match value.strip_prefix('@') {
                Some(tag) => Pattern::Tag(tag.to_string()),
                None => Pattern::Glob(value.to_string()),
            });
        }
        Ok(Selection { patterns })
    }

    /// Whether a resource with `address` and `tags` is selected by a pattern itself.
    pub fn matches(&self, address: &str, tags: &[String]) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Tag(tag) => tags.iter().any(|t| t == tag),
            Pattern::Glob(glob) => glob_matches(glob.as_bytes(), address.as_bytes()),
        })
    }

    /// The patterns that select nothing in `deployment` or `state` (typos, most likely).
    pub fn unmatched(&self, deployment: &Deployment, state: &State) -> Vec<String> {
        self.patterns
            .iter()
            .filter(|p| {
                let one = Selection {
                    patterns: vec![(*p).clone()],
                };
                !deployment
                    .resources
                    .values()
                    .any(|d| one.matches(&d.address, &d.tags))
                    && !state.resources.keys().any(|a| one.matches(a, &[]))
            })
            .map(|p| match p {
                Pattern::Tag(tag) => format!("@{tag}"),
                Pattern::Glob(glob) => glob.clone(),
            })
            .collect()
    }

    /// An error naming the patterns that select nothing in `deployment` or `state`.
    pub fn check(&self, deployment: &Deployment, state: &State) -> Result<(), String> {
        let unmatched = self.unmatched(deployment, state);
        if unmatched.is_empty() {
            return Ok(());
        }
        Err(format!(
            "--target {}: selects no resource of {} or its state; give an address (`web`, `machines.web`), a glob (`machines.*`) or a tag declared with `\"tags\"` (`@web`)",
            unmatched
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", "),
            deployment.file.display()
        ))
    }

    /// The declared resources selected, with everything they depend on (transitively).
    fn closure(&self, deployment: &Deployment) -> HashSet<String> {
        let resources = &deployment.resources;
        let mut todo: Vec<usize> = resources
            .values()
            .enumerate()
            .filter(|(_, d)| self.matches(&d.address, &d.tags))
            .map(|(i, _)| i)
            .collect();
        let mut seen: HashSet<usize> = todo.iter().copied().collect();
        let mut by_address = Vec::new();
        while let Some(i) = todo.pop() {
            let (_, decl) = resources.get_index(i).expect("an index of the deployment");
            by_address.push(decl.address.clone());
            let uses = decl
                .uses
                .iter()
                .filter_map(|a| resources.get_index_of(a.as_str()));
            for j in decl.depends_on.iter().map(|&j| j as usize).chain(uses) {
                if seen.insert(j) {
                    todo.push(j);
                }
            }
        }
        by_address.into_iter().collect()
    }

    /// For `destroy`: the recorded resources selected, with everything that depends on them
    /// (deleted first) and their children.
    fn dependents(&self, state: &State) -> HashSet<String> {
        let mut chosen: HashSet<String> = state
            .resources
            .keys()
            .filter(|a| self.matches(a, &[]))
            .cloned()
            .collect();
        loop {
            let more: Vec<String> = state
                .resources
                .iter()
                .filter(|(a, _)| !chosen.contains(a.as_str()))
                .filter(|(_, r)| {
                    r.dependencies.iter().any(|d| chosen.contains(d))
                        || r.parent.as_ref().is_some_and(|p| chosen.contains(p))
                })
                .map(|(a, _)| a.clone())
                .collect();
            if more.is_empty() {
                return chosen;
            }
            chosen.extend(more);
        }
    }

    /// Splits `changes` into those the run makes and the addresses of those it leaves alone
    /// that would change something. Planning: the selected resources and what they depend on,
    /// recorded resources no longer declared that a pattern names, and children of what is
    /// selected. Destroying: the selected resources and what depends on them.
    pub fn apply(
        &self,
        deployment: &Deployment,
        state: &State,
        mode: crate::session::Mode,
        changes: Vec<PlannedChange>,
    ) -> (Vec<PlannedChange>, Vec<String>) {
        let closure = if mode == crate::session::Mode::Destroy {
            self.dependents(state)
        } else {
            self.closure(deployment)
        };
        let selected = |address: &str| {
            if closure.contains(address) {
                return true;
            }
            if !deployment.resources.contains_key(address) && self.matches(address, &[]) {
                return true;
            }
            // A child (`parent/name`) goes with its parent.
            address
                .rsplit_once('/')
                .is_some_and(|(parent, _)| closure.contains(parent))
        };
        let mut kept = Vec::new();
        let mut left = Vec::new();
        for change in changes {
            if selected(&change.address) {
                kept.push(change);
            } else if change.action != Action::Noop {
                left.push(change.address);
            }
        }
        (kept, left)
    }
}

/// `*` (any run of characters) and `?` (one character) against the whole address.
fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && (glob[g] == b'?' || glob[g] == text[t]) {
            g += 1;
            t += 1;
        } else if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if let Some((sg, st)) = star {
            g = sg + 1;
            t = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_addresses() {
        let m = |g: &str, t: &str| glob_matches(g.as_bytes(), t.as_bytes());
        assert!(m("web", "web"));
        assert!(!m("web", "web2"));
        assert!(m("machines.*", "machines.web"));
        assert!(!m("machines.*", "other.web"));
        assert!(m("web?", "web1"));
        assert!(m("*", "anything"));
        assert!(m("*.db*", "eu.db-primary"));
        assert!(!m("a*b", "acbd"));
    }

    #[test]
    fn tags_and_globs_select() {
        let s = Selection::parse(&["@front".into(), "db.*".into()]).unwrap();
        assert!(s.matches("web", &["front".into()]));
        assert!(s.matches("db.main", &[]));
        assert!(!s.matches("web", &["back".into()]));
        assert!(Selection::parse(&["".into()]).is_err());
        assert!(Selection::parse(&["@".into()]).is_err());
    }
}
