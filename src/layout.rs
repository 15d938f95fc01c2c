//! Two rules of the source's shape, checked by reading it (test code
//! excluded).
//!
//! The protections are siblings: none names another (`crate::admission`
//! from the circuit breaker, say). What they tell each other goes through leaf
//! vocabulary beside `error.rs` (`exchange`, `classify`, `limit`, `deadline`,
//! `jitter`), and `stack.rs` wires them; `cluster` is a store they may use.
//! The test names every import that breaks the rule.
//!
//! No source file is over [`MAX_LINES`] lines: a file that grows past it
//! holds more than one concern (the admission controller once held ten).

use std::path::{Path, PathBuf};

/// The protection modules, and the other layers of a route (README
/// "Layout").
const PROTECTIONS: [&str; 10] = [
    "admission",
    "adaptive",
    "circuit",
    "grpc",
    "rate_limit",
    "spool",
    "body_limit",
    "upstream_timeout",
    "observe",
    "proxy",
];

/// The longest a source file may be, test files and modules excluded.
const MAX_LINES: usize = 600;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// `text` without its trailing `#[cfg(test)]` module.
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod ")
        .map_or(text, |at| &text[..at])
}

/// Every `crate::<other protection>` in `protection`'s sources, as
/// `file:line: text`.
fn crossings(root: &Path, protection: &str) -> Vec<String> {
    let mut files = Vec::new();
    let dir = root.join(protection);
    if dir.is_dir() {
        sources(&dir, &mut files);
    } else {
        files.push(root.join(format!("{protection}.rs")));
    }
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in without_tests(&text).lines().enumerate() {
            for other in PROTECTIONS.iter().filter(|o| **o != protection) {
                let named = format!("crate::{other}");
                let crosses = line.match_indices(&named).any(|(at, _)| {
                    let rest = &line[at + named.len()..];
                    !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if crosses {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn no_protection_imports_another() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found: Vec<String> = PROTECTIONS
        .iter()
        .flat_map(|p| crossings(&root, p))
        .collect();
    assert!(
        found.is_empty(),
        "protections name each other (move the shared vocabulary to a leaf, \
         wire them in stack.rs):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_crossing() {
    let dir = std::env::temp_dir().join(format!("sluicegate-siblings-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("circuit")).unwrap();
    std::fs::write(
        dir.join("circuit/layer.rs"),
        "use crate::admission::Controller;\nuse crate::admission_like::X;\n\
         #[cfg(test)]\nmod tests {\n    use crate::spool::Spool;\n}\n",
    )
    .unwrap();
    let found = crossings(&dir, "circuit");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("layer.rs:1: use crate::admission::Controller;"));
}

#[test]
fn no_source_file_is_over_the_limit() {
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "tests"))
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let lines = without_tests(&text).lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern (at most {MAX_LINES} lines each):\n{}",
        long.join("\n")
    );
}
