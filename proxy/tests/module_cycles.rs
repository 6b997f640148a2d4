//! No dependency cycles between the crate's top-level modules (`src/<module>.rs` or
//! `src/<module>/`): a module may use the ones below it, never one that uses it back.
//!
//! The graph is read from the source text, not from rustc: an edge `a -> b` is a `crate::b…` path
//! (or a `crate::{b…, …}` group) in a file of module `a`. Lines starting with `//` are skipped, and
//! so is the rest of a file after a line starting with `#[cfg(test)]` (tests may reach anywhere).
//! Needs no database.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// module -> module it uses -> where (`file:line`).
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[test]
fn top_level_modules_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for (line, used) in references(&text) {
            if used != module {
                let at = format!("proxy/src/{}:{line}", rel.display());
                graph.entry(module.clone()).or_default().entry(used).or_default().push(at);
            }
        }
    }
    // a wrong path or a broken scanner must not pass for "no cycles"
    let edges: usize = graph.values().map(BTreeMap::len).sum();
    assert!(files.len() > 20 && edges > 20, "read {} files and found {edges} edges under {}", files.len(), src.display());

    let mut report = String::new();
    for component in cycles(&graph) {
        report += &format!("\ncycle among {{{}}}:\n", component.iter().cloned().collect::<Vec<_>>().join(", "));
        let path = shortest_cycle(&graph, &component);
        for pair in path.windows(2) {
            report += &format!("  {} -> {}  {}\n", pair[0], pair[1], graph[&pair[0]][&pair[1]].join(", "));
        }
        report += "  every edge inside it:\n";
        for a in &component {
            for (b, at) in graph[a].iter().filter(|(b, _)| component.contains(*b)) {
                report += &format!("    {a} -> {b}  {}\n", at.join(", "));
            }
        }
    }
    assert!(report.is_empty(), "top-level modules depend on each other in a cycle (issue 17):{report}");
}

#[test]
fn the_scanner_reads_paths_groups_and_skips_comments_and_tests() {
    let text = "use crate::config::Config;\n\
                // crate::server in a comment\n\
                /// crate::console in a doc comment\n\
                let t = crate::backend::Host::Tcp(x); crate::net::listen();\n\
                use crate::{\n    fleet::Fleet,\n    error::{sqlstate, PgError},\n};\n\
                #[cfg(test)]\n\
                use crate::session;\n";
    let found: Vec<(usize, String)> = references(text);
    let expected = [(1, "config"), (4, "backend"), (4, "net"), (6, "fleet"), (7, "error")];
    assert_eq!(found, expected.map(|(l, m)| (l, m.to_string())));
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules a file names as `crate::<module>`, with their (1-based) line numbers.
fn references(text: &str) -> Vec<(usize, String)> {
    let mut code = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        if !trimmed.starts_with("//") {
            code.extend(line.chars().map(|c| (i + 1, c)));
            code.push((i + 1, '\n'));
        }
    }
    let chars: String = code.iter().map(|&(_, c)| c).collect();
    let ident = |at: usize| -> String {
        chars[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
    };
    let mut found = Vec::new();
    for (at, _) in chars.match_indices("crate::") {
        let start = at + "crate::".len();
        if chars[start..].starts_with('{') {
            // `crate::{a::X, b, c::{…}}`: the first name of each item at the group's top level
            let mut depth = 0;
            let mut item_start = true;
            for (offset, c) in chars[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => item_start = true,
                    c if depth == 1 && item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        item_start = false;
                        let pos = start + offset;
                        found.push((code[chars[..pos].chars().count()].0, ident(pos)));
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            let name = ident(start);
            if name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
                found.push((code[chars[..start].chars().count()].0, name));
            }
        }
    }
    found.retain(|(_, m)| m != "self");
    found
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        out: Vec<BTreeSet<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let lw = self.low[w.as_str()];
                    self.low.entry(v).and_modify(|l| *l = (*l).min(lw));
                } else if self.stack.contains(&w.as_str()) {
                    let iw = self.index[w.as_str()];
                    self.low.entry(v).and_modify(|l| *l = (*l).min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    component.insert(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), out: Vec::new() };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// A shortest cycle through the component's first module, as the modules along it (first = last).
fn shortest_cycle(graph: &Graph, component: &BTreeSet<String>) -> Vec<String> {
    let start = component.first().unwrap();
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start.as_str()]);
    while let Some(v) = queue.pop_front() {
        for w in graph[v].keys().filter(|w| component.contains(*w)) {
            if w == start {
                let mut path = vec![start.clone(), v.to_string()];
                let mut at = v;
                while at != start {
                    at = came_from[at];
                    path.push(at.to_string());
                }
                path.reverse();
                return path;
            }
            if !came_from.contains_key(w.as_str()) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a strongly connected component has a cycle through each of its modules")
}
