//! `cargo xtask modules [--bless]`: the agent's module graph, read from its sources. An edge
//! `a → b` is a `crate::b` path in a file of the top-level module `a` (comments aside; test
//! files and test fakes left out, as they may reach anywhere). Fails on a cycle between modules,
//! and when the Mermaid map in `docs/architecture.md` (between its markers) is not the graph's;
//! `--bless` rewrites that map from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util;

/// The agent's sources, relative to the workspace root.
const SOURCES: &str = "agent/src";
/// The page whose module map is the graph's.
const PAGE: &str = "docs/architecture.md";
const BEGIN: &str = "<!-- modules: begin (cargo xtask modules --bless) -->";
const END: &str = "<!-- modules: end -->";

/// Module → the modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

pub fn run(bless: bool) -> Result<()> {
    let root = util::workspace_root();
    let graph = graph(&root.join(SOURCES))?;
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    let cycles = cycles(&graph);
    println!(
        "modules: {} modules, {edges} edges, {} cycle(s)",
        graph.len(),
        cycles.len()
    );
    for cycle in &cycles {
        println!("modules: cycle: {}", cycle.join(" → "));
    }
    let page_path = root.join(PAGE);
    let page = std::fs::read_to_string(&page_path)
        .with_context(|| format!("reading {}", page_path.display()))?;
    let (before, rest) = page
        .split_once(BEGIN)
        .with_context(|| format!("{PAGE} has no line {BEGIN}"))?;
    let (current, after) = rest
        .split_once(END)
        .with_context(|| format!("{PAGE} has no line {END}"))?;
    let map = mermaid(&graph);
    if bless {
        std::fs::write(&page_path, format!("{before}{BEGIN}{map}{END}{after}"))
            .with_context(|| format!("writing {}", page_path.display()))?;
        println!("modules: wrote the module map of {PAGE}");
    } else if current != map {
        bail!("the module map in {PAGE} is not the code's: run `cargo xtask modules --bless`");
    }
    if !cycles.is_empty() {
        bail!("{} cycle(s) between the agent's modules", cycles.len());
    }
    Ok(())
}

/// The graph of the top-level modules under `src`.
fn graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    walk(src, &mut files)?;
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(src, file) else {
            continue;
        };
        if is_test(src, file) {
            continue;
        }
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for to in crate_paths(&text) {
            if to != from && modules.contains(&to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    Ok(graph)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(())
}

/// `http` for `src/http.rs` and `src/http/…`; none for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Test modules and test fakes: `tests.rs`, `tests/…`, `fake.rs`.
fn is_test(src: &Path, file: &Path) -> bool {
    file.strip_prefix(src).is_ok_and(|rel| {
        rel.components().any(|c| {
            matches!(
                c.as_os_str().to_str(),
                Some("tests" | "tests.rs" | "fake.rs")
            )
        })
    })
}

/// The first segment of every `crate::…` path outside comments, groups (`crate::{a, b::C}`)
/// included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = text
        .lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let code = without_test_items(&code);
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let names = match rest.strip_prefix('{') {
            Some(group) => group_items(group),
            None => vec![identifier(rest)],
        };
        found.extend(
            names
                .into_iter()
                .filter(|n| !n.is_empty())
                .map(str::to_owned),
        );
    }
    found
}

/// `code` without the items under `#[cfg(test)]` (an inline `mod tests { … }`, a test-only
/// `use` or `impl`): each is skipped to its `;` or to the end of its braces.
fn without_test_items(code: &str) -> String {
    const TEST_ONLY: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(TEST_ONLY) {
        out.push_str(&rest[..at]);
        let item = &rest[at + TEST_ONLY.len()..];
        let end = match item.find([';', '{']) {
            Some(i) if item.as_bytes()[i] == b';' => i + 1,
            Some(open) => {
                let mut depth = 0usize;
                let close = item[open..].char_indices().find_map(|(i, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(open + i + 1);
                            }
                        }
                        _ => {}
                    }
                    None
                });
                close.unwrap_or(item.len())
            }
            None => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The first identifier of each item of a use group (`group` starts after its `{`).
fn group_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .map(|item| identifier(item.trim_start()))
        .collect()
}

/// The identifier `s` starts with.
fn identifier(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every cycle's modules (the strongly connected components with more than one module),
/// each in the order a walk along its edges finds them.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let mut placed = BTreeSet::new();
    let mut found = Vec::new();
    for m in graph.keys() {
        if placed.contains(m) || !reaches(m, m) {
            continue;
        }
        let component: Vec<String> = graph
            .keys()
            .filter(|other| *other == m || (reaches(m, other) && reaches(other, m)))
            .cloned()
            .collect();
        placed.extend(component.iter().cloned());
        found.push(component);
    }
    found
}

/// The graph as a Mermaid flowchart, modules that use others above the ones they use.
fn mermaid(graph: &Graph) -> String {
    let mut out = String::from("\n```mermaid\nflowchart TD\n");
    for (from, tos) in graph {
        if tos.is_empty() {
            let _ = writeln!(out, "    {from}");
        }
        for to in tos {
            let _ = writeln!(out, "    {from} --> {to}");
        }
    }
    out.push_str("```\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_comments_and_tests_are_not_uses_and_groups_are() {
        let text = "use crate::a::B;\n// crate::b\nfn f() { crate::c::d(); } // crate::e\n\
                    use crate::{\n    f::{G, H},\n    i,\n};\n\
                    #[cfg(test)]\nuse crate::j::K;\n#[cfg(test)]\nmod tests {\n    use crate::k::{L};\n    fn t() { if x { crate::l::m(); } }\n}\nuse crate::n;\n";
        let found: Vec<String> = crate_paths(text).into_iter().collect();
        assert_eq!(found, ["a", "c", "f", "i", "n"]);
    }

    #[test]
    fn a_cycle_is_found_with_all_its_modules() {
        let graph: Graph = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a", "d"]),
            ("d", vec![]),
        ]
        .into_iter()
        .map(|(m, to)| (m.to_owned(), to.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(cycles(&graph), [vec!["a", "b", "c"]]);
        let mut acyclic = graph.clone();
        acyclic.get_mut("c").unwrap().remove("a");
        assert!(cycles(&acyclic).is_empty());
    }
}
